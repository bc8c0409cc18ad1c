"""The guide's Oxford Flowers command: train_unconditional.py --dataset_name=huggan/flowers-102-categories ..."""

from uncond_flax.configs import default


def get_config():
    c = default.get_config()
    c.dataset_name = "huggan/flowers-102-categories"
    c.resolution = 64
    c.output_dir = "ddpm-ema-flowers-64"
    c.train_batch_size = 16
    c.num_epochs = 100
    c.gradient_accumulation_steps = 1
    c.learning_rate = 1e-4
    c.lr_warmup_steps = 500
    c.mixed_precision = "no"
    return c

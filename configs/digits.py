"""Offline demo: scikit-learn's 1,797 bundled 8x8 digits, upscaled to 16 px, on a small grayscale UNet.

Sized for a 2-core CPU (about 10 minutes); samples from the exported pipeline are recognisable digits.
"""

from uncond_flax.configs import default


def get_config():
    c = default.get_config()
    c.dataset_name = "digits"
    c.resolution = 16
    c.output_dir = "ddpm-digits-16"
    # Running the demo again continues (or, when finished, just re-exports) instead of refusing a used output_dir.
    c.resume_from_checkpoint = "latest"
    c.train_batch_size = 64
    c.num_epochs = 90
    c.learning_rate = 1e-3
    c.lr_warmup_steps = 100
    c.use_ema = True
    c.ema_max_decay = 0.999
    c.save_images_epochs = 30
    c.save_model_epochs = 30
    c.sample_scheduler = "ddim"
    c.sample_num_inference_steps = 50
    c.model.in_channels = 1
    c.model.out_channels = 1
    c.model.block_out_channels = (16, 32, 32)
    c.model.down_block_types = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D")
    c.model.up_block_types = ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    c.model.layers_per_block = 1
    c.model.norm_num_groups = 8
    c.model.attention_head_dim = 16
    return c

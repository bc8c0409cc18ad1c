"""Ho et al. (2020) CIFAR-10: the 35.7M-parameter UNet (google/ddpm-cifar10-32), linear betas, 800k steps."""

from uncond_flax.configs import default


def get_config():
    c = default.get_config()
    c.dataset_name = "cifar10"  # images in the "img" column, auto-detected
    c.resolution = 32
    c.random_flip = True
    c.output_dir = "ddpm-cifar10-32"
    c.train_batch_size = 128  # per device: 128 is the paper's global batch on one device; use 16 on 8 devices
    c.max_train_steps = 800_000
    c.learning_rate = 2e-4
    c.lr_scheduler = "constant_with_warmup"
    c.lr_warmup_steps = 5000
    c.use_ema = True
    c.ema_max_decay = 0.9999
    c.ddpm_beta_schedule = "linear"
    c.save_images_epochs = 50
    c.save_model_epochs = 50
    c.checkpointing_steps = 10_000
    c.model.block_out_channels = (128, 256, 256, 256)
    c.model.down_block_types = ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    c.model.up_block_types = ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    c.model.attention_head_dim = None
    c.model.downsample_padding = 0
    c.model.flip_sin_to_cos = False
    c.model.freq_shift = 1
    c.model.norm_eps = 1e-6
    c.model.dropout = 0.1
    return c

"""The guide's multi-GPU command (fp16, EMA, center crop, random flip, wandb) for every device of every host."""

from uncond_flax.configs import naruto64


def get_config():
    c = naruto64.get_config()
    c.center_crop = True
    c.random_flip = True
    c.use_ema = True
    c.mixed_precision = "fp16"  # on TPUs prefer "bf16": no loss scaling needed
    c.logger = "wandb"
    return c

"""The guide's Naruto command: train_unconditional.py --dataset_name=lambdalabs/naruto-blip-captions ..."""

from uncond_flax.configs import flowers64


def get_config():
    c = flowers64.get_config()
    c.dataset_name = "lambdalabs/naruto-blip-captions"
    c.output_dir = "ddpm-ema-naruto-64"
    return c

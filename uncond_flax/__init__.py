"""uncond-flax: unconditional DDPM training in JAX/Flax, exactly compatible with diffusers."""

__version__ = "0.1.0"

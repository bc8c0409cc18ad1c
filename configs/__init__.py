"""Training configs: `default.py` holds every field; the variants import it and change a few.

Installed, this folder is the package `uncond_flax.configs` (`--config=digits` picks `digits.py`); a config of your
own starts with `from uncond_flax.configs import default`.
"""

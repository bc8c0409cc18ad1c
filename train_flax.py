"""Train an unconditional DDPM with JAX, the way diffusers' train_unconditional.py does (`uncond-flax-train`).

python train_flax.py --config=configs/digits.py
python train_flax.py --config=configs/flowers64.py --config.output_dir=ddpm-ema-flowers-64 --config.train_batch_size=16
python train_flax.py --help    # every config field with its default
"""

if __name__ == "__main__":  # grain's worker processes import this module; they must not train
    from uncond_flax.cli import main

    main()

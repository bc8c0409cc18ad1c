"""Export any training checkpoint as a diffusers DDPMPipeline folder (EMA weights by default).

python -m uncond_flax.convert ddpm-ema-flowers-64/checkpoints/1500 --output flowers-step-1500
python -m uncond_flax.convert ddpm-ema-flowers-64/checkpoints --raw --output flowers-latest-raw
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import ml_collections


def export_checkpoint(checkpoint: str, output: str, *, use_ema: bool = True) -> int:
    """Write the pipeline folder for `checkpoint` (a step directory, or a checkpoints directory: its latest
    step); returns the step exported. Runs on one local device, whatever the run was trained on."""
    from uncond_flax.checkpointing import Checkpointer, abstract_like, resolve_resume
    from uncond_flax.export import save_pipeline
    from uncond_flax.optim import make_optimizer
    from uncond_flax.parallel import make_mesh
    from uncond_flax.train import inference_model, noise_scheduler_for, train_state_layout

    directory, step = resolve_resume(checkpoint, checkpoint)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoints directory {directory}")
    checkpointer = Checkpointer(directory, read_only=True)
    try:
        if step == "latest":
            step = checkpointer.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {directory}")
        config = ml_collections.ConfigDict(checkpointer.read_config(step))
        if use_ema and not config.use_ema:
            raise ValueError(f"checkpoint {step} has no EMA weights (trained with use_ema=False); pass --raw")
        mesh = make_mesh(devices=jax.local_devices()[:1])
        _, eval_graphdef, abstract, shardings, _ = train_state_layout(config, mesh, make_optimizer(config, 1))
        state, _ = checkpointer.restore(step, abstract_like(abstract, shardings))
    finally:
        checkpointer.close()
    if not use_ema:
        state = state.replace(ema_params=None)
    save_pipeline(output, inference_model(eval_graphdef, state), noise_scheduler_for(config))
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a step directory (.../checkpoints/1500) or a checkpoints directory")
    parser.add_argument("--output", required=True, help="the DDPMPipeline folder to write")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    args = parser.parse_args(argv)
    try:
        step = export_checkpoint(args.checkpoint, args.output, use_ema=not args.raw)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"uncond_flax.convert: error: {e}")
    print(f"checkpoint {step} ({'raw' if args.raw else 'EMA'} weights) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

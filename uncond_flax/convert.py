"""Export any training checkpoint as a diffusers DDPMPipeline folder (EMA weights by default).

python -m uncond_flax.convert ddpm-ema-flowers-64/checkpoints/1500 --output flowers-step-1500
python -m uncond_flax.convert ddpm-ema-flowers-64/checkpoints --raw --output flowers-latest-raw

A step that fails verification is an error; given a checkpoints directory (or the run's output_dir), the newest
step that verifies is exported and the damaged newer ones are named.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

import jax
import ml_collections

from uncond_flax import storage

if TYPE_CHECKING:
    from uncond_flax.checkpointing import Checkpointer
    from uncond_flax.models import FlaxUNet2DModel

PROG = "uncond_flax.convert"
logger = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint path that names no checkpoint, or one that cannot be read; the message is one line."""


def locate_checkpoint(path: str) -> tuple[str, int | None]:
    """(checkpoints directory, step) for a step directory (`.../checkpoints/1500`); (directory, None: its newest
    step) for a checkpoints directory or a run's output_dir."""
    path = storage.abspath(path)
    if storage.basename(path).isdigit():
        parent = storage.dirname(path)
        if not storage.isdir(parent):
            raise CheckpointError(f"{path}: no such checkpoint ({parent} does not exist)")
        return parent, int(storage.basename(path))
    if not storage.isdir(path):
        raise CheckpointError(
            f"{path}: no such directory; give a step directory (…/checkpoints/1500) or a checkpoints directory"
        )
    nested = storage.join(path, "checkpoints")
    return (nested if storage.isdir(nested) else path), None


def restore_checkpoint_model(
    checkpoint: str, *, use_ema: bool = True, mesh: jax.sharding.Mesh | None = None
) -> tuple[FlaxUNet2DModel, ml_collections.ConfigDict, int]:
    """(float32 FlaxUNet2DModel, the run's config, step) from a checkpoint path (see `locate_checkpoint`), its
    weights replicated on `mesh` (default: one local device). EMA weights, or the raw ones with use_ema=False.

    A named step that fails verification is an error; for a directory, the newest step that verifies is used
    (the damaged newer ones are named in a warning), as `resume_from_checkpoint=latest` does.
    """
    from uncond_flax.checkpointing import CheckpointCorrupt, Checkpointer

    directory, step = locate_checkpoint(checkpoint)
    checkpointer = Checkpointer(directory, read_only=True)
    try:
        steps = checkpointer.all_steps()
        if step is not None and step not in steps:
            raise CheckpointError(
                f"no checkpoint {step} in {directory} (found: {', '.join(map(str, steps)) or 'none'})"
            )
        if not steps:
            raise CheckpointError(f"no checkpoint in {directory}")
        skipped = []
        for candidate in [step] if step is not None else reversed(steps):
            try:
                return _restore_step(checkpointer, candidate, use_ema, mesh)
            except CheckpointCorrupt as e:
                if step is not None:
                    raise
                logger.warning("skipping %s", e)
                skipped.append(str(e))
        raise CheckpointCorrupt(f"no checkpoint in {directory} verifies ({'; '.join(skipped)})")
    finally:
        checkpointer.close()


def _restore_step(
    checkpointer: Checkpointer, step: int, use_ema: bool, mesh: jax.sharding.Mesh | None
) -> tuple[FlaxUNet2DModel, ml_collections.ConfigDict, int]:
    from uncond_flax.checkpointing import abstract_like
    from uncond_flax.optim import make_optimizer
    from uncond_flax.parallel import make_mesh
    from uncond_flax.train_state import inference_model, train_state_layout

    config = ml_collections.ConfigDict(checkpointer.read_config(step))
    if use_ema and not config.use_ema:
        raise CheckpointError(
            f"checkpoint {checkpointer.step_dir(step)} has no EMA weights (trained with use_ema=False); pass --raw"
        )
    mesh = make_mesh(devices=jax.local_devices()[:1]) if mesh is None else mesh
    _, eval_graphdef, abstract, shardings, _ = train_state_layout(config, mesh, make_optimizer(config, 1))
    state, _ = checkpointer.restore(step, abstract_like(abstract, shardings))
    if not use_ema:
        state = state.replace(ema_params=None)
    return inference_model(eval_graphdef, state), config, step


def export_checkpoint(checkpoint: str, output: str, *, use_ema: bool = True) -> int:
    """Write the pipeline folder for `checkpoint` (see `restore_checkpoint_model`); returns the step exported.
    Runs on one local device, whatever the run was trained on."""
    from uncond_flax.config import noise_scheduler_for
    from uncond_flax.export import save_pipeline

    model, config, step = restore_checkpoint_model(checkpoint, use_ema=use_ema)
    save_pipeline(output, model, noise_scheduler_for(config))
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", help="a step directory (.../checkpoints/1500), or a checkpoints directory or run output_dir"
    )
    parser.add_argument("--output", required=True, help="the DDPMPipeline folder to write")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")
    args = parser.parse_args(argv)
    from uncond_flax.cli import quiet_library_tracebacks
    from uncond_flax.errors import one_line

    quiet_library_tracebacks()  # a damaged checkpoint is our one line, not orbax's traceback of it
    try:
        step = export_checkpoint(args.checkpoint, args.output, use_ema=not args.raw)
    except (ValueError, OSError) as e:
        sys.exit(f"{PROG}: error: {one_line(e)}")
    print(f"checkpoint {step} ({'raw' if args.raw else 'EMA'} weights) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Train an unconditional DDPM with JAX, the way diffusers' train_unconditional.py does.

python train_flax.py --config=configs/digits.py
python train_flax.py --config=configs/flowers64.py --config.output_dir=ddpm-ema-flowers-64 --config.train_batch_size=16
"""

import logging as pylogging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file, e.g. configs/digits.py.", lock_config=True
)


def _fail(error: BaseException) -> None:
    """Exit with the error as one line (ml_collections nests repr-quoted, multi-line messages)."""
    text = str(error)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # a repr-quoted message
        text = text[1:-1].replace("\\n", " ").replace("\\'", "'")
    sys.exit("train_flax.py: error: " + (" ".join(text.split()) or type(error).__name__))


def _parse_flags(argv: list[str]) -> list[str]:
    """absl parsing, but a bad flag or override is one line, not a traceback."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 -- flags, config files and overrides raise many types
        _fail(e)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; set options with --config.FIELD=value")
    logging.set_verbosity(logging.INFO)
    for library in ("absl", "jax", "orbax"):  # our progress at INFO; libraries only when they warn
        pylogging.getLogger(library).setLevel(pylogging.WARNING)
    from uncond_flax.checkpointing import PREEMPTED_EXIT_CODE, Preempted
    from uncond_flax.train import ConfigError, train_and_evaluate

    config = _CONFIG.value
    try:
        config.seed  # noqa: B018 -- a config file that failed to load raises on first use
    except OSError as e:
        _fail(e.__cause__ or e)
    try:
        train_and_evaluate(config)
    except ConfigError as e:
        _fail(e)
    except Preempted as e:
        print(f"train_flax.py: {e}", file=sys.stderr)
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":  # grain's worker processes import this module; they must not train
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=_parse_flags)

"""Train an unconditional DDPM with JAX, the way diffusers' train_unconditional.py does.

uncond-flax-train --config=digits (a shipped config), or python train_flax.py --config=configs/digits.py (a file).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading

from uncond_flax.errors import one_line  # standard library only, like everything this module imports up front

# Set by the SIGTERM handler main() installs first thing, before the trainer has its own (a scheduler may preempt a
# job in its first seconds); the trainer reads it through sigterm_received().
_SIGTERM = threading.Event()

_HELP_ARGS = ("-h", "--help", "-help", "--h", "-?")


def sigterm_received() -> bool:
    """Whether this process got a SIGTERM since `main` started (before or after the trainer's own handler)."""
    return _SIGTERM.is_set()


def _record_sigterm(signum, frame) -> None:
    _SIGTERM.set()


def record_sigterm() -> None:
    """From now on a SIGTERM is recorded (see `sigterm_received`) instead of ending the process."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _record_sigterm)


def settle_early_sigterm() -> bool:
    """After the distributed start: whether a SIGTERM came and this lone process should stop before training.

    With several processes JAX's preemption service owns SIGTERM from `jax.distributed.initialize` on; the signal
    is handed to it, so that every process stops and saves at the same step.
    """
    import jax

    if not sigterm_received():
        return False
    if not jax.distributed.is_initialized():
        return True
    signal.raise_signal(signal.SIGTERM)
    return False


def shipped_configs_dir() -> str:
    """The configs that ship with the package (the repo's configs/, installed as uncond_flax/configs)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def shipped_config_names() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(shipped_configs_dir()) if f.endswith(".py") and f != "__init__.py")


def resolve_config_path(value: str) -> str:
    """`--config`'s value as a file path: an existing file, or the name of a shipped config (`digits`)."""
    path, sep, arg = value.partition(":")  # ml_collections passes what follows ":" to get_config
    if os.path.isfile(path):
        return value
    name = path.removesuffix(".py")
    if os.sep not in name and name in shipped_config_names():
        return os.path.join(shipped_configs_dir(), name + ".py") + sep + arg
    raise ValueError(f"--config={value}: no such file, and not a shipped config ({', '.join(shipped_config_names())})")


def _prog(argv: list[str]) -> str:
    return os.path.basename(argv[0]) if argv else "uncond-flax-train"


def _config_arg(argv: list[str]) -> int | None:
    """Index of `--config`'s value in argv (`--config=X` or `--config X`), if given."""
    for i, arg in enumerate(argv[1:], 1):
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return i + 1
        if arg.startswith(("--config=", "-config=")):
            return i
    return None


def _with_config_path(argv: list[str]) -> list[str]:
    i = _config_arg(argv)
    if i is None:
        return argv
    prefix, eq, value = argv[i].partition("=") if argv[i].startswith("-") else ("", "", argv[i])
    return [*argv[:i], prefix + eq + resolve_config_path(value), *argv[i + 1 :]]


def _split_none_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take `--config.FIELD=None` out of argv (absl would parse it as the string 'None' or fail on an int field).

    Returns the remaining argv and the fields to set to None; a later `--config.FIELD=VALUE` still wins.
    """
    last: dict[str, bool] = {}  # field -> whether its last override is None
    for arg in argv[1:]:
        if arg.startswith(("--config.", "-config.")):
            field, _, value = arg.split(".", 1)[1].partition("=")
            last[field] = value in ("None", "none")
    nones = [field for field, is_none in last.items() if is_none]

    def dropped(arg: str) -> bool:
        if not arg.startswith(("--config.", "-config.")):
            return False
        field, _, value = arg.split(".", 1)[1].partition("=")
        return field in nones or value in ("None", "none")

    return [argv[0], *(a for a in argv[1:] if not dropped(a))], nones


def _set_none(config, field: str) -> None:
    """Set a field to None where its default may be None (a FieldReference in the config), else ValueError."""
    *parents, key = field.split(".")
    holder = config
    for part in parents:
        holder = holder.get(part)
        if holder is None or not hasattr(holder, "items"):
            raise ValueError(f"--config.{field}=None: no such field")
    if key not in holder:
        raise ValueError(f"--config.{field}=None: no such field")
    if not _may_be_none(dict(holder.items(preserve_field_references=True))[key]):
        raise ValueError(f"--config.{field}=None: {field} may not be None (it is {holder[key]!r} here); give a value")
    holder[key] = None


def _may_be_none(field) -> bool:
    # The configs declare optional fields as typed FieldReferences (`distributed`, typed `object`, takes a choice).
    from ml_collections import FieldReference

    return isinstance(field, FieldReference) and field.get_type() is not object


def config_fields(config, prefix: str = "") -> list[tuple[str, object, bool]]:
    """(dotted name, value, may be None) for every field of a ConfigDict, nested ones included."""
    from ml_collections import ConfigDict, FieldReference

    fields = []
    for key, field in config.items(preserve_field_references=True):
        if isinstance(field, ConfigDict):
            fields.extend(config_fields(field, prefix + key + "."))
        else:
            value = field.get() if isinstance(field, FieldReference) else field
            fields.append((prefix + key, value, _may_be_none(field)))
    return fields


def _print_help(argv: list[str]) -> None:
    import importlib.util

    i = _config_arg(argv)
    path, _, arg = resolve_config_path(argv[i].split("=", 1)[-1] if i is not None else "default").partition(":")
    spec = importlib.util.spec_from_file_location("_help_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*([arg] if arg else []))
    print(f"usage: {_prog(argv)} --config=CONFIG [--config.FIELD=VALUE ...] [--verbose]\n")
    print(__doc__.strip())
    print(
        "\n  --config              a config file, or a shipped config: " + ", ".join(shipped_config_names()),
        "  --config.FIELD=VALUE  set a field below; =None unsets one marked (may be None)",
        "  --verbose             print the traceback behind a one-line error",
        "  --helpfull            every absl flag",
        f"\nconfig fields and their values in {path}:",
        sep="\n",
    )
    fields = config_fields(config)
    width = max(len(name) for name, _, _ in fields)
    for name, value, optional in fields:
        print(f"  {name:<{width}}  {value!r}" + ("  (may be None)" if optional else ""))


def _unknown_field(error: BaseException, argv: list[str]) -> ValueError | None:
    """ml_collections' KeyError for an override of a field the config lacks ("'name' Did you mean ...") as a
    sentence that says what to do; None for any other error."""
    found = re.match(r"'([^']+)'(?:.*Did you mean \"([^\"]+)\")?", one_line(error))
    if not isinstance(error, (KeyError, AttributeError)) or not found:  # ml_collections raises both
        return None
    name, suggestion = found.groups()
    override = next((a.split("=")[0] for a in argv if f".{name}." in a.split("=")[0] + "."), None)
    if override is None or not override.startswith("--config."):
        return None
    hint = f"did you mean {override[: override.index(f'.{name}') + 1]}{suggestion}? " if suggestion else ""
    return ValueError(f"{override}: no such field; {hint}--help lists every field with its value")


def _fail(prog: str, verbose: bool, error: BaseException) -> None:
    """Exit with the error as one line; with --verbose, the traceback behind it first."""
    if verbose:
        import traceback

        traceback.print_exception(error)
    else:
        import logging as pylogging
        import warnings

        # Library threads still winding down (orbax's failed save) must not print after the line that says what
        # happened: no more log records, nor "coroutine ... was never awaited" warnings at exit.
        pylogging.disable(pylogging.CRITICAL)
        warnings.filterwarnings("ignore", category=RuntimeWarning)
    sys.exit(f"{prog}: error: {one_line(error)}")


def main(argv: list[str] | None = None) -> None:
    """Console entry point `uncond-flax-train`; `python train_flax.py` is the same."""
    record_sigterm()
    argv = list(sys.argv if argv is None else argv)
    prog = _prog(argv)
    # Read before absl parses, so that a flag or override that fails to parse can show its traceback too.
    verbose = any(a in ("--verbose", "-verbose", "--verbose=true", "--verbose=True") for a in argv[1:])
    try:
        if any(a in _HELP_ARGS for a in argv[1:]):
            with contextlib.suppress(BrokenPipeError):  # `--help | head`
                _print_help(argv)
            sys.exit(0)
        if _config_arg(argv) is None:
            raise ValueError(f"--config is required: a config file, or one of {', '.join(shipped_config_names())}")
        argv, nones = _split_none_overrides(_with_config_path(argv))
    except ValueError as e:
        _fail(prog, verbose, e)

    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "A config file or a shipped config's name (digits).", lock_config=True, sys_argv=argv
    )
    flags.DEFINE_bool("verbose", False, "Print the traceback behind a one-line error.")

    def parse_flags(args: list[str]) -> list[str]:
        try:
            return flags.FLAGS(args)
        except Exception as e:  # noqa: BLE001 -- flags, config files and overrides raise many types
            _fail(prog, verbose, _unknown_field(e, args) or e)

    def run(args: list[str]) -> None:
        if len(args) > 1:
            _fail(prog, verbose, ValueError(f"unexpected arguments {args[1:]}: set fields with --config.FIELD=VALUE"))
        try:
            config = config_flag.value
            try:
                config.seed  # noqa: B018 -- a config file that failed to load raises on first use
            except OSError as e:
                raise e.__cause__ or e
            for field in nones:
                _set_none(config, field)
        except (OSError, ValueError) as e:
            _fail(prog, verbose, e)
        sys.exit(_train(config, prog, verbose))

    app.run(run, argv=argv, flags_parser=parse_flags)


def _without_traceback(record) -> bool:
    """A logging filter: the record's message, without the traceback of an exception attached to it."""
    record.exc_info = record.exc_text = record.stack_info = None
    return True


def quiet_library_tracebacks() -> None:
    """Library failures without their tracebacks: orbax, gcsfs and asyncio log each failure of their worker threads,
    with tracebacks, before or after the error reaches us, and our own last line says what happened and what to do
    (`--verbose` keeps them)."""
    import logging as pylogging

    pylogging.getLogger("gcsfs").setLevel(pylogging.CRITICAL)
    # orbax's per-save event loops leave failed futures behind ("Future exception was never retrieved"), logged at
    # exit, after our own last line; the failure they hold is the one the run already reported.
    pylogging.getLogger("asyncio").setLevel(pylogging.CRITICAL)
    pylogging.getLogger("absl").addFilter(_without_traceback)  # orbax logs through absl
    for handler in pylogging.getLogger().handlers:
        handler.addFilter(_without_traceback)
    previous_unraisable = sys.unraisablehook

    def unraisable(info) -> None:  # tensorstore and orbax report their leftovers' errors as unraisable
        if not _is_leftover_noise(info.exc_value):
            previous_unraisable(info)

    sys.unraisablehook = unraisable


def _is_leftover_noise(error: BaseException | None) -> bool:
    """Errors of work a failure left behind: tensorstore's callbacks on an event loop orbax already closed, and
    orbax's read coroutines that raise while being closed (GeneratorExit), after one read failed and the restore
    gave up on the rest."""
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    return error is not None and isinstance(error.__cause__ or error.__context__, GeneratorExit)


def _train(config, prog: str, verbose: bool) -> int:
    import logging as pylogging

    import jax
    from absl import logging

    from uncond_flax.checkpointing import PREEMPTED_EXIT_CODE, Preempted
    from uncond_flax.config import ConfigError
    from uncond_flax.parallel import join_cluster
    from uncond_flax.train import TrainingError, train_and_evaluate

    logging.set_verbosity(logging.INFO)
    for library in ("absl", "jax", "orbax"):  # our progress at INFO; libraries only when they warn
        pylogging.getLogger(library).setLevel(pylogging.WARNING)
    if not verbose:
        quiet_library_tracebacks()
    try:
        join_cluster(config)
    except ValueError as e:
        _fail(prog, verbose, e)
    if settle_early_sigterm():
        print(f"{prog}: preempted before training started: nothing saved; run the same command again", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    if config.get("cpu_reuse_memory", True) and not jax.distributed.is_initialized():
        from uncond_flax.cpu_runtime import reuse_cpu_memory

        reuse_cpu_memory()  # before JAX's backend starts; only this process runs here
    try:
        train_and_evaluate(config)
    except (ConfigError, TrainingError) as e:
        _fail(prog, verbose, e)
    except Preempted as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0

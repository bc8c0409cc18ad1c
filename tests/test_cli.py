"""The train entry point as users meet it: --help, shipped configs by name, None overrides, one-line errors with
--verbose behind them, and a SIGTERM before training starts."""

import os
import signal
import socket
import subprocess
import sys
import time

import ml_collections
import pytest

from uncond_flax import cli

from test_train import ROOT

TRAIN = os.path.join(ROOT, "train_flax.py")
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny_digits.py")


def _run(*args, cwd=ROOT, timeout=300):
    return subprocess.run([sys.executable, TRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _flat(config, prefix=""):
    """Every leaf of a ConfigDict as {dotted name: value}, from its dict form."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, prefix + key + "."))
        else:
            out[prefix + key] = value
    return out


def test_help_lists_every_config_field_with_its_default_from_any_directory(tmp_path):
    from configs import default, digits

    for config_arg, module in ((None, default), ("--config=digits", digits)):
        result = _run(*([config_arg] if config_arg else []), "--help", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        listed = {
            line.split()[0]: line.split(None, 1)[1] for line in lines if line.startswith("  ") and len(line.split()) > 1
        }
        expected = _flat(module.get_config().to_dict())
        assert len(expected) > 80
        for name, value in expected.items():
            assert name in listed, f"{name} missing from --help"
            assert listed[name].startswith(repr(value)), (name, listed[name], value)
        assert listed["max_train_steps"].endswith("(may be None)")
        assert not listed["resolution"].endswith("(may be None)")
        assert f"values in {os.path.join(ROOT, 'uncond_flax', 'configs', module.__name__.split('.')[-1] + '.py')}" in (
            result.stdout
        )


def test_shipped_config_names_resolve_and_unknown_ones_are_one_line(tmp_path):
    assert os.path.samefile(cli.resolve_config_path("digits"), os.path.join(ROOT, "configs", "digits.py"))
    assert cli.resolve_config_path("digits.py:arg").endswith(os.path.join("configs", "digits.py") + ":arg")
    assert cli.resolve_config_path(TINY) == TINY  # a file wins
    assert set(cli.shipped_config_names()) == {
        f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py") and f != "__init__.py"
    }
    result = _run("--config=digitz", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        (
            "train_flax.py: error: --config=digitz: no such file, and not a shipped config "
            "(cifar10, default, digits, flowers64, naruto64, naruto64_multi_fp16)"
        )
    ]


def test_the_entry_point_module_imports_only_the_standard_library():
    # --help answers at once and the early SIGTERM handler is in place before JAX loads only while importing cli
    # (and what it imports up front: uncond_flax.errors) loads nothing outside the standard library.
    code = (
        "import sys; before = set(sys.modules); import uncond_flax.cli; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['uncond_flax']"


def test_none_overrides_unset_optional_fields_and_the_last_override_wins():
    argv = [
        "prog",
        "--config=x.py",
        "--config.max_train_steps=7",
        "--config.max_train_steps=None",
        "--config.dataset_name=None",
        "--config.resume_from_checkpoint=None",
        "--config.resume_from_checkpoint=latest",
        "--config.model.attention_head_dim=None",
    ]
    rest, nones = cli._split_none_overrides(argv)
    assert rest == ["prog", "--config=x.py", "--config.resume_from_checkpoint=latest"]
    assert nones == ["max_train_steps", "dataset_name", "model.attention_head_dim"]

    from configs import digits

    config = digits.get_config()
    config.max_train_steps = 7
    config.lock()
    for field in nones:
        cli._set_none(config, field)
    assert config.max_train_steps is None and config.dataset_name is None and config.model.attention_head_dim is None
    config.max_train_steps = 3  # still an int field
    with pytest.raises(TypeError):
        config.max_train_steps = "3"
    for field, message in (
        ("resolution", f"resolution may not be None (it is {config.resolution} here)"),
        ("distributed", "distributed may not be None"),
        ("model.in_channels", "model.in_channels may not be None"),
        ("resolutio", "no such field"),
        ("model.nope", "no such field"),
        ("nope.x", "no such field"),
    ):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            cli._set_none(config, field)


def test_none_reaches_the_config_from_the_command_line():
    # dataset_name=None (not the string 'None': that would be looked up as a Hub dataset) and an int field set to
    # None parse; the run then stops at diffusers' own check that some data is given.
    result = _run(f"--config={TINY}", "--config.max_train_steps=None", "--config.dataset_name=None")
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "train_flax.py: error: You must specify either a dataset name from the hub or a train data directory."
    )


def test_bad_override_is_one_line_and_verbose_shows_the_traceback_behind_it():
    quiet = _run("--config=digits", "--config.resolution=None")
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    line = "train_flax.py: error: --config.resolution=None: resolution may not be None (it is 8 here); give a value"
    assert quiet.stderr.strip().splitlines() == [line]

    loud = _run("--config=digits", "--config.resolution=None", "--verbose")
    assert loud.returncode == 1
    assert "Traceback (most recent call last)" in loud.stderr and "in _set_none" in loud.stderr
    assert loud.stderr.strip().splitlines()[-1] == line

    parse = _run("--config=digits", "--config.learning_rate=fast", "--verbose")  # fails inside absl's parsing
    assert parse.returncode == 1 and "Traceback (most recent call last)" in parse.stderr
    assert parse.stderr.strip().splitlines()[-1].startswith("train_flax.py: error: ")


def test_config_name_as_its_own_argument_and_stray_arguments_are_one_line(tmp_path):
    # `--config digits` (absl's other form) resolves the shipped name too; a word that is no flag (a forgotten
    # `--config.` prefix) stops the run instead of being dropped. dataset_name=None: a run that got past both checks
    # would stop at the missing data instead, never train.
    result = _run("--config", "digits", "--config.dataset_name=None", "resolution=32", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        "train_flax.py: error: unexpected arguments ['resolution=32']: set fields with --config.FIELD=VALUE"
    ]


def _catches_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(mask >> (signal.SIGTERM - 1) & 1)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the signal mask from /proc")
def test_sigterm_before_training_starts_exits_75_in_one_line(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, TRAIN, f"--config={TINY}", f"--config.output_dir={tmp_path / 'out'}"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while not _catches_sigterm(proc.pid):  # the entry point's handler, installed before the heavy imports
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr
    assert stderr.strip().splitlines()[-1] == (
        "train_flax.py: preempted before training started: nothing saved; run the same command again"
    )
    assert not os.path.exists(tmp_path / "out" / "checkpoints")


def test_config_fields_walks_nested_configs():
    config = ml_collections.ConfigDict(
        {"a": 1, "b": ml_collections.FieldReference(None, field_type=str), "m": {"c": (1, 2)}}
    )
    assert cli.config_fields(config) == [("a", 1, False), ("b", None, True), ("m.c", (1, 2), False)]


_EARLY_SIGTERM_PAIR = """
import os, signal, sys, time
from uncond_flax import cli
from uncond_flax.parallel import initialize_distributed
address, process_id = sys.argv[1], int(sys.argv[2])
cli.record_sigterm()
if process_id == 1:
    os.kill(os.getpid(), signal.SIGTERM)  # before the processes have joined: only recorded
assert cli.sigterm_received() == (process_id == 1)
initialize_distributed("auto", address, 2, process_id, timeout_s=60)
stop_alone = cli.settle_early_sigterm()
from jax.experimental import multihost_utils
for step in range(300):  # the trainer asks this after every step
    if multihost_utils.reached_preemption_sync_point(step):
        print("sync point", step, stop_alone)
        break
    time.sleep(0.02)
"""


def test_an_early_sigterm_to_one_process_stops_every_process_at_one_step():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _EARLY_SIGTERM_PAIR, address, str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    lines = [out.strip().splitlines()[-1] if out.strip() else "" for out, _ in outputs]
    assert lines[0].startswith("sync point ") and lines[0] == lines[1], outputs
    assert lines[0].endswith(" False")  # neither stops alone: both go on to the agreed step


_LEFTOVERS = """
import sys
from uncond_flax import cli


class Suspend:
    def __await__(self):
        yield


async def read_shard():  # as orbax's reads, abandoned after another one failed
    try:
        await Suspend()
    except GeneratorExit as e:
        raise Exception("read abandoned") from e


class Callback:
    def __init__(self, message, kind):
        self.message, self.kind = message, kind

    def __del__(self):
        raise self.kind(self.message)


if sys.argv[1] == "quiet":
    cli.quiet_library_tracebacks()
reader = read_shard()
reader.send(None)
del reader
Callback("Event loop is closed", RuntimeError)
Callback("a real bug", ValueError)
"""


@pytest.mark.parametrize("mode", ["quiet", "default"])
def test_leftovers_of_a_failure_are_quiet_and_other_unraisable_errors_are_not(mode):
    out = subprocess.run(
        [sys.executable, "-c", _LEFTOVERS, mode], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stderr
    assert "a real bug" in out  # never hidden
    hidden = mode == "quiet"
    assert ("read abandoned" in out) != hidden and ("Event loop is closed" in out) != hidden, out

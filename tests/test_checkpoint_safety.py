"""Nothing lost, nothing mixed: the retention limit, the rules for a used output_dir, one run per output_dir,
damaged checkpoints, and the private orbax APIs this project leans on."""

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath
from test_checkpointing import CHILD_ENV, kernel, metrics_at, run_child, saved_state, train_cmd, wait_for
from test_train import ROOT, tiny_config

from uncond_flax.checkpointing import Checkpointer, checkpoint_dir
from uncond_flax.config import ConfigError
from uncond_flax.run_lock import LOCK_NAME, Holder, LocalLockFile, LockHeld, RunLock
from uncond_flax.train import train_and_evaluate

COMMON = {"checkpointing_steps": 2, "use_ema": True, "save_images_epochs": 1000, "save_model_epochs": 1000}


def steps_in(folder):
    return sorted(int(name) for name in os.listdir(folder) if name.isdigit())


def abandoned_dirs(checkpoints):
    return sorted(checkpoints / name for name in os.listdir(checkpoints) if name.startswith("abandoned-"))


def test_a_total_limit_below_one_is_refused(tmp_path):
    # Before: orbax's max_to_keep=0 deleted every checkpoint, the SIGTERM one included.
    with pytest.raises(ConfigError, match=r"^checkpoints_total_limit=0 must be an integer >= 1"):
        train_and_evaluate(tiny_config(tmp_path, checkpoints_total_limit=0, max_train_steps=2, **COMMON))


def test_a_used_output_dir_needs_resume_or_overwrite_and_an_older_resume_sets_newer_steps_aside(tmp_path, caplog):
    checkpoints = tmp_path / "out" / "checkpoints"
    train_and_evaluate(tiny_config(tmp_path, max_train_steps=6, **COMMON))
    assert steps_in(checkpoints) == [2, 4, 6]
    old_4 = kernel(saved_state(tmp_path / "out", 4)["params"], "conv_out")

    # A fresh start over another run's checkpoints: one line, nothing touched.
    with pytest.raises(ConfigError, match=r"holds checkpoints \[2, 4, 6\] of an earlier run; .*overwrite_output_dir"):
        train_and_evaluate(tiny_config(tmp_path, max_train_steps=6, **COMMON))
    assert steps_in(checkpoints) == [2, 4, 6]

    # Resume step 2 with another learning rate and a limit of 2: the old 4 and 6 move aside (kept), the new 4
    # is saved, and retention keeps the new trajectory's newest two.
    with caplog.at_level("WARNING", logger="uncond_flax"):
        train_and_evaluate(
            tiny_config(
                tmp_path,
                max_train_steps=4,
                learning_rate=3e-3,
                checkpoints_total_limit=2,
                resume_from_checkpoint="2",
                **COMMON,
            )
        )
    (aside,) = abandoned_dirs(checkpoints)
    assert steps_in(checkpoints) == [2, 4] and steps_in(aside) == [4, 6]
    assert f"moved the newer checkpoints [4, 6] (another trajectory, or damaged) to {aside}" in caplog.text

    # Resuming from another checkpoints folder (here the set-aside one) over this output_dir's own checkpoints is
    # a fresh start for this folder: refused the same way, nothing touched.
    with pytest.raises(ConfigError, match=r"holds checkpoints \[2, 4\] of an earlier run; .*overwrite_output_dir"):
        train_and_evaluate(tiny_config(tmp_path, max_train_steps=6, resume_from_checkpoint=str(aside), **COMMON))
    assert steps_in(checkpoints) == [2, 4] and steps_in(aside) == [4, 6]
    new_4 = kernel(saved_state(tmp_path / "out", 4)["params"], "conv_out")
    assert not np.array_equal(old_4, new_4)  # the new trajectory's step 4, not the old one

    # `latest` is now the new trajectory's 4, not the abandoned 6.
    caplog.clear()
    with caplog.at_level("INFO", logger="uncond_flax"):
        state = train_and_evaluate(tiny_config(tmp_path, max_train_steps=4, resume_from_checkpoint="latest", **COMMON))
    assert "resumed from checkpoint 4 in" in caplog.text and int(state.step) == 4
    restored = jax.tree.leaves(state.params["conv_out"]["kernel"])[0]
    np.testing.assert_array_equal(new_4, np.asarray(restored).transpose(3, 2, 0, 1))

    # overwrite_output_dir: the earlier checkpoints are deleted, saying so (set-aside ones stay).
    caplog.clear()
    with caplog.at_level("WARNING", logger="uncond_flax"):
        train_and_evaluate(tiny_config(tmp_path, max_train_steps=2, overwrite_output_dir=True, **COMMON))
    assert "overwrite_output_dir: deleted the earlier run's checkpoints [2, 4]" in caplog.text
    assert steps_in(checkpoints) == [2] and abandoned_dirs(checkpoints) == [aside]


def _damage(checkpoints, good, step, how):
    """A copy of checkpoint `good` as `step`, damaged `how`."""
    target = checkpoints / str(step)
    if how == "empty folder":
        target.mkdir()
        return
    shutil.copytree(checkpoints / str(good), target)
    data_files = sorted((target / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    if how == "flipped byte":  # inside the array data: orbax reads it back without complaint
        data = bytearray(data_files[-1].read_bytes())
        data[1000] ^= 0x10
        data_files[-1].write_bytes(bytes(data))
    elif how == "truncated data file":
        data_files[-1].write_bytes(data_files[-1].read_bytes()[: data_files[-1].stat().st_size // 2])
    elif how == "no _METADATA":
        (target / "state" / "_METADATA").unlink()
    elif how == "no data/metadata":
        (target / "data" / "metadata").unlink()
    elif how == "no state/commit_success.txt":
        (target / "state" / "commit_success.txt").unlink()
    elif how in ("edited data position", "edited config"):  # valid JSON, readable: only the digest tells
        item = target / ("data" if how == "edited data position" else "config") / "metadata"
        record = json.loads(item.read_text())
        key = "step_in_epoch" if how == "edited data position" else "learning_rate"
        record[key] = record[key] * 2 + 1
        item.write_text(json.dumps(record))


DAMAGE = {
    5: ("flipped byte", r"is damaged: the checksums saved with it do not match \."),
    6: ("truncated data file", r"cannot be read: "),
    7: ("no _METADATA", r"is incomplete: .*/7/state/_METADATA is missing"),
    8: ("no data/metadata", r"is incomplete: .*/8/data/metadata is missing"),
    9: ("empty folder", r"is incomplete: .*/9/commit_success.txt is missing"),
    10: ("no state/commit_success.txt", r"is incomplete: .*/10/state/commit_success.txt is missing"),
    11: ("edited data position", r"is damaged: the checksums saved with it do not match data$"),
    12: ("edited config", r"is damaged: the checksums saved with it do not match config$"),
}


def test_damaged_checkpoints_are_named_and_latest_falls_back_past_them(tmp_path, caplog):
    checkpoints = tmp_path / "out" / "checkpoints"
    train_and_evaluate(tiny_config(tmp_path, max_train_steps=4, **COMMON))
    for step, (how, _) in DAMAGE.items():
        _damage(checkpoints, 4, step, how)

    # An explicit step that does not verify: one line naming it and what is wrong; nothing moves.
    for step, (how, message) in DAMAGE.items():
        config = tiny_config(tmp_path, max_train_steps=4, resume_from_checkpoint=str(step), **COMMON)
        with pytest.raises(ConfigError, match=rf"^checkpoint {step} in {checkpoints} {message}") as error:
            train_and_evaluate(config)
        assert "\n" not in str(error.value), how
    assert steps_in(checkpoints) == [2, 4, *DAMAGE]

    # convert refuses a damaged checkpoint (it exported the flipped weights with rc 0).
    from uncond_flax.convert import main as convert

    with pytest.raises(SystemExit, match=r"checkpoint 5 .* the checksums saved with it do not match"):
        convert([str(checkpoints / "5"), "--output", str(tmp_path / "exported")])
    assert not (tmp_path / "exported" / "unet").exists()

    # `latest`: the newest checkpoint that verifies, each skipped one named with its reason; the damaged ones
    # are moved aside, so a later save of those steps cannot be mistaken for them.
    with caplog.at_level("INFO", logger="uncond_flax"):
        state = train_and_evaluate(tiny_config(tmp_path, max_train_steps=4, resume_from_checkpoint="latest", **COMMON))
    assert int(state.step) == 4 and "resumed from checkpoint 4 in" in caplog.text
    for step, (how, message) in DAMAGE.items():
        assert any(
            record.levelname == "WARNING"
            and re.search(rf"skipping checkpoint {step} in .* {message}", record.getMessage())
            for record in caplog.records
        ), how
    (aside,) = abandoned_dirs(checkpoints)
    assert steps_in(checkpoints) == [2, 4] and steps_in(aside) == list(DAMAGE)


def _holder_file(path, **changes):
    holder = dataclasses.replace(Holder.this_process(), **changes)
    path.write_text(json.dumps(dataclasses.asdict(holder)))
    return holder


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    store = LocalLockFile(str(tmp_path / LOCK_NAME))
    first = RunLock(store, "output_dir X").acquire()
    with pytest.raises(
        LockHeld,
        match=rf"^output_dir X is in use by another run \(host {socket.gethostname()}, pid {os.getpid()}, since ",
    ):
        RunLock(store, "output_dir X").acquire()
    first.release()
    assert not os.path.exists(store.location)

    # A process on this machine that has exited (its pid is checked, not the heartbeat).
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    _holder_file(tmp_path / LOCK_NAME, pid=child.pid, since=time.time())
    with caplog.at_level("WARNING", logger="uncond_flax"):
        lock = RunLock(store, "output_dir X").acquire()
    assert f"pid {child.pid} on this host has exited" in caplog.text
    lock.release()

    # Another machine: live while its heartbeat (the file's mtime) is fresh, stale once it is old.
    _holder_file(tmp_path / LOCK_NAME, host="elsewhere", boot_id="other", pid=1)
    with pytest.raises(LockHeld, match=r"host elsewhere, pid 1"):
        RunLock(store, "output_dir X", stale_after_s=60).acquire()
    old = time.time() - 61
    os.utime(store.location, (old, old))
    RunLock(store, "output_dir X", stale_after_s=60).acquire().release()


def test_run_lock_heartbeat_and_a_lost_lock(tmp_path):
    store = LocalLockFile(str(tmp_path / LOCK_NAME))
    lock = RunLock(store, "output_dir X", heartbeat_s=0.05).acquire()
    old = time.time() - 1000
    os.utime(store.location, (old, old))
    deadline = time.time() + 30
    while os.stat(store.location).st_mtime < old + 500 and time.time() < deadline:
        time.sleep(0.05)
    assert os.stat(store.location).st_mtime > old + 500, "the heartbeat did not refresh the lock"

    # Another run judged this one dead and took the lock: the heartbeat notices, release leaves theirs alone.
    theirs = _holder_file(tmp_path / LOCK_NAME, host="elsewhere", boot_id="other", pid=1)
    while not lock.lost and time.time() < deadline:
        time.sleep(0.05)
    assert lock.lost
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == theirs.token


def test_the_local_lock_file_acts_only_on_the_version_it_saw(tmp_path):
    path = tmp_path / LOCK_NAME
    ours, theirs = LocalLockFile(str(path)), LocalLockFile(str(path))  # two runs
    assert ours.read() is None
    released = ours.create(b"an earlier run")
    ours.delete(released)
    first = ours.create(b"ours")
    assert first is not None and path.read_bytes() == b"ours"
    assert theirs.create(b"theirs") is None and path.read_bytes() == b"ours"
    # The version they judged stale is gone: their takeover of it writes nothing and leaves nothing beside it.
    assert theirs.replace(b"theirs", released) is None and path.read_bytes() == b"ours"
    assert os.listdir(tmp_path) == [LOCK_NAME]
    taken = theirs.replace(b"theirs", first)
    assert taken is not None and path.read_bytes() == b"theirs" and os.listdir(tmp_path) == [LOCK_NAME]
    # The old holder can neither renew nor release what is now theirs.
    assert ours.refresh(first) is None
    ours.delete(first)
    assert path.read_bytes() == b"theirs"
    theirs.delete(taken)
    assert not path.exists()


def _process_state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_run_lock_takes_over_a_reused_pid_and_an_exited_unreaped_process(tmp_path, caplog):
    store = LocalLockFile(str(tmp_path / LOCK_NAME))
    # The pid is alive (this process), but it started at another time: the holder exited and its pid was reused.
    _holder_file(tmp_path / LOCK_NAME, pid=os.getpid(), pid_start="1")
    with caplog.at_level("WARNING", logger="uncond_flax"):
        RunLock(store, "output_dir X").acquire().release()
    assert f"pid {os.getpid()} on this host has exited" in caplog.text

    # A holder that exited but whose parent has not collected it yet (a zombie) is dead too.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 30
        while _process_state(child.pid) != "Z" and time.time() < deadline:
            time.sleep(0.05)
        assert _process_state(child.pid) == "Z"
        with open(f"/proc/{child.pid}/stat") as f:
            start = f.read().rsplit(")", 1)[1].split()[19]
        _holder_file(tmp_path / LOCK_NAME, pid=child.pid, pid_start=start)
        caplog.clear()
        with caplog.at_level("WARNING", logger="uncond_flax"):
            RunLock(store, "output_dir X").acquire().release()
        assert f"pid {child.pid} on this host has exited" in caplog.text
    finally:
        child.wait()


@flax.struct.dataclass
class _TinyState:
    params: dict
    ema_params: dict


def _tiny_state(value):
    return _TinyState(params={"w": jnp.full((4,), value)}, ema_params={"w": jnp.full((4,), value)})


def test_a_save_is_refused_before_newer_steps_for_non_finite_weights_and_after_the_lock_is_lost(tmp_path):
    directory = tmp_path / "checkpoints"
    checkpointer = Checkpointer(str(directory), max_to_keep=2)
    lock = None
    try:
        checkpointer.save(4, _tiny_state(1.0), {"global_step": 4}, {"seed": 0})
        checkpointer.wait()
        # Retention keeps the newest steps: an older one would be deleted as soon as it was written.
        with pytest.raises(ValueError, match=rf"^refusing to checkpoint step 2: {directory} holds newer steps \[4\]"):
            checkpointer.save(2, _tiny_state(1.0), {"global_step": 2}, {"seed": 0})
        with pytest.raises(FloatingPointError, match=r"^refusing to checkpoint step 6: the weights contain NaN or inf"):
            checkpointer.save(6, _tiny_state(float("nan")), {"global_step": 6}, {"seed": 0})
        # Another run judged this one dead and took its lock: this one must not write into that run's folder.
        lock = RunLock(LocalLockFile(str(directory / LOCK_NAME)), "output_dir X", heartbeat_s=0.05).acquire()
        checkpointer.lock = lock
        _holder_file(directory / LOCK_NAME, host="elsewhere", boot_id="other", pid=1)
        deadline = time.time() + 30
        while not lock.lost and time.time() < deadline:
            time.sleep(0.05)
        with pytest.raises(RuntimeError, match=rf"^not saving step 8: another run took over {directory / LOCK_NAME}"):
            checkpointer.save(8, _tiny_state(1.0), {"global_step": 8}, {"seed": 0})
        checkpointer.wait()
        assert steps_in(directory) == [4]
    finally:
        if lock is not None:
            lock.release()
        checkpointer.close()


def test_a_second_run_in_one_output_dir_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    args = ("--config.max_train_steps=100000", "--config.checkpointing_steps=2", "--config.log_every=1")
    first = subprocess.Popen(
        train_cmd(run, *args), cwd=ROOT, env=CHILD_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: len(metrics_at(run)) >= 4, first, what="the first run's step 4")
        second = run_child(train_cmd(run, "--config.max_train_steps=4", "--config.checkpointing_steps=2"))
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert (
            second.stderr.strip()
            .splitlines()[-1]
            .startswith(
                f"train_flax.py: error: output_dir {run} is in use by another run (host {socket.gethostname()}, "
                f"pid {first.pid}, since "
            )
        ), second.stderr[-3000:]
        assert first.poll() is None, "the first run must go on"
    finally:
        first.kill()
        first.wait()
    assert (run / "checkpoints" / LOCK_NAME).exists()  # kill -9: nothing released it

    third = run_child(
        train_cmd(
            run, "--config.max_train_steps=2", "--config.checkpointing_steps=2", "--config.overwrite_output_dir=True"
        )
    )
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"pid {first.pid} on this host has exited" in third.stderr
    assert steps_in(run / "checkpoints") == [2] and not (run / "checkpoints" / LOCK_NAME).exists()


def test_checkpoint_dir_leaves_urls_alone():
    config = ml_collections.ConfigDict({"output_dir": "gs://bucket/runs/a/"})
    assert checkpoint_dir(config) == "gs://bucket/runs/a/checkpoints"


def test_the_private_orbax_apis_we_use_still_exist(tmp_path):
    # Checkpointer.close waits on this (else a quick exit dies under orbax's cleanup thread).
    assert callable(ocp.CheckpointManager._maybe_await_cleanup_tmp_directory)
    # tests/fixtures/slow_save_train.py delays this method to kill a run mid-commit; it must be what orbax
    # uses for a local directory, or the fixture would patch nothing.
    from orbax.checkpoint._src.path import atomicity, atomicity_defaults

    assert (
        atomicity_defaults.get_default_temporary_path_class(epath.Path(tmp_path)) is atomicity.AtomicRenameTemporaryPath
    )
    assert callable(atomicity.AtomicRenameTemporaryPath.finalize)


def test_array_checksums_see_every_bit_and_ignore_the_device_layout():
    from uncond_flax.checkpointing import _checksums

    def reference(x):  # Σ w·(2i+1) mod 2^32 over the little-endian words, in numpy
        words = np.asarray(x).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[np.asarray(x).dtype.itemsize])
        words = words.reshape(-1).astype(np.uint64)
        return int((words * (2 * np.arange(words.size, dtype=np.uint64) + 1)).sum() % 2**32)

    rng = np.random.default_rng(0)
    tree = {
        "f32": rng.standard_normal((8, 6, 3)).astype(np.float32),
        "bf16": jnp.asarray(rng.standard_normal((8, 5)), jnp.bfloat16),
        "i32": rng.integers(-(2**31), 2**31, (16,), dtype=np.int32),
        "flag": np.array(True),
    }
    sums = jax.device_get(_checksums(tree))
    for name, x in tree.items():
        assert int(sums[name]) == reference(x), name
    mesh = jax.make_mesh((8,), ("x",))
    sharded = jax.device_put(tree["f32"], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
    assert int(_checksums({"f32": sharded})["f32"]) == reference(tree["f32"])
    bits = tree["f32"].view(np.uint32).reshape(-1)
    variants = {}
    for i in range(0, bits.size, 7):  # any one flipped bit, anywhere
        flipped = bits.copy()
        flipped[i] ^= np.uint32(1 << (i % 32))
        variants[f"bit {i % 32} of word {i}"] = flipped.view(np.float32).reshape(tree["f32"].shape)
    variants["two rows swapped"] = tree["f32"][[1, 0, *range(2, 8)]]
    original = int(sums["f32"])
    assert all(int(v) != original for v in jax.device_get(_checksums(variants)).values())


def test_a_checkpoint_with_nan_in_its_optimizer_state_is_refused_at_resume(tmp_path):
    # Saves refuse non-finite weights and EMA weights only; a NaN elsewhere in the state (an Adam moment here),
    # written with valid checksums, is caught when a run resumes from it, before a step could spread it.
    config = tiny_config(tmp_path, max_train_steps=2, **COMMON)
    state = train_and_evaluate(config)
    checkpoints = epath.Path(tmp_path / "out" / "checkpoints")
    read = ocp.JsonCheckpointHandler()
    data, run_config = (read.restore(checkpoints / "2" / item) for item in ("data", "config"))
    leaves, treedef = jax.tree.flatten(state.opt_state)
    i = next(i for i, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.size > 1)
    leaves[i] = leaves[i].at[(0,) * leaves[i].ndim].set(jnp.nan)
    shutil.rmtree(checkpoints / "2")
    checkpointer = Checkpointer(str(checkpoints))
    try:
        checkpointer.save(2, state.replace(opt_state=jax.tree.unflatten(treedef, leaves)), data, run_config)
        checkpointer.wait()
    finally:
        checkpointer.close()
    resume = tiny_config(tmp_path, max_train_steps=4, resume_from_checkpoint="latest", **COMMON)
    with pytest.raises(ConfigError, match=r"^checkpoint 2 in .* holds NaN or inf in its weights or optimizer state"):
        train_and_evaluate(resume)
    assert steps_in(checkpoints) == [2]

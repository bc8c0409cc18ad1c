"""Checkpoints: bit-exact resume after SIGTERM, kill -9 during a save, resharding, retention, config checks."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_train import ROOT, read_metrics, tiny_config

from uncond_flax import train as train_module
from uncond_flax.checkpointing import PREEMPTED_EXIT_CODE, Checkpointer, resolve_resume
from uncond_flax.config import ConfigError
from uncond_flax.parallel import make_mesh
from uncond_flax.train import train_and_evaluate

# Subprocesses share the suite's compilation cache, so only the first one compiles.
CHILD_ENV = {
    **os.environ,
    "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
}


def run_child(cmd, env=None, check=False):
    """`cmd` run as the tests run the CLIs: from the repo root, in CHILD_ENV (or `env`), its output captured as text."""
    return subprocess.run(
        cmd, cwd=ROOT, env=CHILD_ENV if env is None else env, capture_output=True, text=True, timeout=600, check=check
    )


def train_cmd(output_dir, *overrides, script="train_flax.py"):
    return [
        sys.executable,
        os.path.join(ROOT, script),
        "--config=tests/fixtures/tiny_digits.py",
        f"--config.output_dir={output_dir}",
        "--config.use_ema=True",
        "--config.save_images_epochs=1000",
        "--config.save_model_epochs=1000",
        "--config.log_every=1",  # a metrics line as each step ends: the tests time their signals by them
        *overrides,
    ]


def saved_state(output_dir, step):
    """The `state` item of a checkpoint as nested dicts of numpy arrays, whatever devices wrote it."""
    path = os.path.join(output_dir, "checkpoints", str(step), "state")
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(path).item_metadata.tree
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def kernel(tree, module):
    """A conv kernel from a restored state subtree, in PyTorch's OIHW layout."""
    return np.asarray(tree[module]["kernel"]["value"]).transpose(3, 2, 0, 1)


def metrics_at(output_dir):
    path = os.path.join(output_dir, "logs", "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_for(predicate, proc, timeout=300, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"process exited ({proc.returncode}) before {what}: {out[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def test_sigterm_and_kill_9_then_resume_is_bit_exact(tmp_path):
    """Run A trains 60 steps straight. Run B gets a SIGTERM mid-run, resumes, is SIGKILLed while its next
    checkpoint commits, resumes again from the last committed one, and ends bit-identical to A."""
    steps, every = 60, 20
    args = (f"--config.max_train_steps={steps}", f"--config.checkpointing_steps={every}")
    straight = tmp_path / "straight"
    run_child(train_cmd(straight, *args), check=True)

    run = tmp_path / "interrupted"
    # 1. SIGTERM after step 22: the current step finishes, a checkpoint is saved there, the exit code says so.
    proc = subprocess.Popen(
        train_cmd(run, *args), cwd=ROOT, env=CHILD_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for(lambda: len(metrics_at(run)) >= every + 2, proc, what="step 22")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert "resume with --config.resume_from_checkpoint=latest" in out.strip().splitlines()[-1]
    stopped_at = int(out.split("checkpoint at step ")[1].split()[0])
    assert every < stopped_at < 2 * every, f"SIGTERM should land before step 40, it saved step {stopped_at}"
    assert sorted(int(s) for s in os.listdir(run / "checkpoints")) == [every, stopped_at]

    # 2. Resume, and SIGKILL the process while checkpoint 40 sits in orbax's temporary directory.
    proc = subprocess.Popen(
        train_cmd(run, *args, "--config.resume_from_checkpoint=latest", script="tests/fixtures/slow_save_train.py"),
        cwd=ROOT,
        env={**CHILD_ENV, "UNCOND_FLAX_SLOW_SAVE_STEP": str(2 * every)},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = ""
    while f"COMMITTING {2 * every}" not in line:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "the run ended before committing step 40"
    proc.kill()
    proc.wait()
    leftovers = os.listdir(run / "checkpoints")
    assert str(stopped_at) in leftovers and str(2 * every) not in leftovers
    assert any(".orbax-checkpoint-tmp" in d for d in leftovers), leftovers

    # 3. Resume again: from the last committed checkpoint; the unfinished one is cleaned up.
    resumed = run_child(train_cmd(run, *args, "--config.resume_from_checkpoint=latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from checkpoint {stopped_at}" in resumed.stderr
    assert sorted(int(s) for s in os.listdir(run / "checkpoints")) == [every, stopped_at, 2 * every, steps]

    a, b = saved_state(straight, steps), saved_state(run, steps)
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b and {"params", "ema_params", "opt_state"} <= set(a)
    for x, y in zip(leaves_a, leaves_b):  # params, EMA params and step, Adam moments, counters
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # The losses after the first resume are A's, step for step.
    losses_a = {m["step"]: m["loss"] for m in metrics_at(straight)}
    losses_b = {m["step"]: m["loss"] for m in metrics_at(run) if m["step"] > stopped_at}
    assert sorted(losses_b) == list(range(stopped_at + 1, steps + 1))
    assert all(losses_b[s] == losses_a[s] for s in losses_b)


def test_a_sigterm_on_a_checkpointing_step_saves_once_and_exits_for_requeue(tmp_path):
    # The step's periodic checkpoint is the preemption checkpoint: not written twice (orbax refuses a second save of
    # a step, which turned the preemption into a failed run that a scheduler would not requeue).
    stopped = run_child(
        train_cmd(
            tmp_path,
            "--config.max_train_steps=6",
            "--config.checkpointing_steps=2",
            script="tests/fixtures/sigterm_at_step.py",
        ),
        env={**CHILD_ENV, "UNCOND_FLAX_SIGTERM_AT_STEP": "2"},
    )
    assert stopped.returncode == PREEMPTED_EXIT_CODE, stopped.stderr[-3000:]
    assert "preempted: checkpoint at step 2 saved in" in stopped.stderr
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_restore_on_another_device_count_continues_training(tmp_path, monkeypatch):
    # 8 devices x 2 per device, then 1 device x 16: the same global batch, so the same data.
    eight = tiny_config(
        tmp_path,
        use_ema=True,
        max_train_steps=4,
        checkpointing_steps=2,
        save_images_epochs=1000,
        save_model_epochs=1000,
    )
    state_8 = train_and_evaluate(eight)
    saved = jax.tree.map(np.asarray, state_8)

    monkeypatch.setattr(train_module, "make_mesh", lambda fsdp: make_mesh(devices=jax.devices()[:1]))
    restore_only = tiny_config(
        tmp_path,
        use_ema=True,
        max_train_steps=4,
        checkpointing_steps=2,
        train_batch_size=16,
        resume_from_checkpoint="latest",
        save_images_epochs=1000,
        save_model_epochs=1000,
    )
    state_1 = train_and_evaluate(restore_only)  # nothing left to train: just the restore
    assert all(leaf.sharding.device_set == {jax.devices()[0]} for leaf in jax.tree.leaves(state_1.params))
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(state_1), strict=True):
        np.testing.assert_array_equal(a, np.asarray(b))

    more = tiny_config(
        tmp_path,
        use_ema=True,
        max_train_steps=6,
        checkpointing_steps=2,
        train_batch_size=16,
        resume_from_checkpoint="latest",
        save_images_epochs=1000,
        save_model_epochs=1000,
    )
    state_6 = train_and_evaluate(more)
    assert int(state_6.step) == 6
    assert [m["step"] for m in read_metrics(more)] == [1, 2, 3, 4, 5, 6]


def test_total_limit_latest_when_empty_and_model_mismatch(tmp_path, caplog):
    config = tiny_config(
        tmp_path,
        max_train_steps=6,
        checkpointing_steps=2,
        checkpoints_total_limit=2,
        use_ema=True,
        resume_from_checkpoint="latest",
        save_images_epochs=1000,
        save_model_epochs=1000,
    )
    with caplog.at_level("INFO", logger="uncond_flax"):
        train_and_evaluate(config)
    assert "no checkpoint in" in caplog.text and "starting fresh" in caplog.text
    assert sorted(int(s) for s in os.listdir(tmp_path / "out" / "checkpoints")) == [4, 6]

    other_model = tiny_config(
        tmp_path, resume_from_checkpoint="checkpoint-6", use_ema=True, **{"model.layers_per_block": 2}
    )
    with pytest.raises(ConfigError, match=r"checkpoint 6 .* model\.layers_per_block differ"):
        train_and_evaluate(other_model)
    # EMA on or off changes the TrainState's structure: named as such, not as an unreadable checkpoint.
    without_ema = tiny_config(tmp_path, resume_from_checkpoint="checkpoint-6", use_ema=False)
    with pytest.raises(ConfigError, match=r"checkpoint 6 .* training setup: use_ema differ"):
        train_and_evaluate(without_ema)
    with pytest.raises(ConfigError, match=r"no checkpoint for step 5 .*found \[4, 6\]"):
        train_and_evaluate(tiny_config(tmp_path, resume_from_checkpoint="5", use_ema=True))

    # Any checkpoint exports as a diffusers pipeline, EMA weights by default.
    from diffusers import DDPMPipeline

    from uncond_flax.convert import main as convert

    checkpoints = str(tmp_path / "out" / "checkpoints")
    assert convert([checkpoints, "--output", str(tmp_path / "ema")]) == 0
    assert convert([os.path.join(checkpoints, "4"), "--raw", "--output", str(tmp_path / "raw4")]) == 0
    saved = saved_state(tmp_path / "out", 6)
    ema = DDPMPipeline.from_pretrained(str(tmp_path / "ema")).unet.state_dict()["conv_out.weight"].numpy()
    np.testing.assert_array_equal(ema, kernel(saved["ema_params"], "conv_out"))
    raw = DDPMPipeline.from_pretrained(str(tmp_path / "raw4")).unet.state_dict()["conv_out.weight"].numpy()
    np.testing.assert_array_equal(raw, kernel(saved_state(tmp_path / "out", 4)["params"], "conv_out"))


def test_resume_from_checkpoint_values(tmp_path):
    root = str(tmp_path / "checkpoints")
    os.makedirs(os.path.join(root, "1500", "state"))
    assert resolve_resume(None, root) == (root, None)
    assert resolve_resume("latest", root) == (root, "latest")
    assert resolve_resume("checkpoint-1500", root) == (root, 1500)
    assert resolve_resume(1500, root) == (root, 1500)
    assert resolve_resume(os.path.join(root, "1500"), "/elsewhere") == (root, 1500)
    assert resolve_resume(root, "/elsewhere") == (root, "latest")
    with pytest.raises(ValueError, match="resume_from_checkpoint='nope'"):
        resolve_resume("nope", root)


def test_close_waits_for_the_cleanup_of_a_killed_save(tmp_path):
    # orbax removes stale temporary dirs in a background thread started with the manager; a run that stops
    # at once (a config error) must not exit under that thread.
    stale = tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234"
    stale.mkdir(parents=True)
    (stale / "partial").write_text("x")
    (tmp_path / "checkpoints" / "notes.txt").write_text("kept")
    # A reader (convert, sample, another run resuming from here) leaves it: the run that owns it may be saving.
    Checkpointer(str(tmp_path / "checkpoints"), read_only=True).close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["7.orbax-checkpoint-tmp-1234", "notes.txt"]
    checkpointer = Checkpointer(str(tmp_path / "checkpoints"))
    checkpointer.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["notes.txt"]


def test_resume_without_ema_in_fp16_is_bit_exact(tmp_path):
    """4 steps in one run equal 2 steps, a checkpoint, and a resumed run of 2 more, for a run with no EMA (the
    state's ema_params is None) in fp16: weights, Adam moments, the loss scale and its good-step count, the
    counters, and the losses logged after the resume. (EMA in fp32 is the SIGTERM test above.)"""
    common = dict(
        use_ema=False, mixed_precision="fp16", checkpointing_steps=2, save_images_epochs=1000, save_model_epochs=1000
    )
    straight_config = tiny_config(tmp_path / "straight", max_train_steps=4, **common)
    straight = train_and_evaluate(straight_config)
    train_and_evaluate(tiny_config(tmp_path / "split", max_train_steps=2, **common))
    resumed_config = tiny_config(tmp_path / "split", max_train_steps=4, resume_from_checkpoint="latest", **common)
    resumed = train_and_evaluate(resumed_config)

    assert resumed.ema_params is None and resumed.loss_scale.is_dynamic
    leaves_a, tree_a = jax.tree.flatten(straight)
    leaves_b, tree_b = jax.tree.flatten(resumed)
    assert tree_a == tree_b
    for a, b in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    losses = {m["step"]: m["loss"] for m in read_metrics(straight_config)}
    after_resume = {m["step"]: m["loss"] for m in read_metrics(resumed_config) if m["step"] > 2}
    assert after_resume == {3: losses[3], 4: losses[4]}

    # No EMA weights to export: convert says so (and writes nothing) rather than export the raw ones as EMA.
    from uncond_flax.convert import main as convert

    with pytest.raises(
        SystemExit, match=r"checkpoint .*/4 has no EMA weights \(trained with use_ema=False\); pass --raw"
    ):
        convert([str(tmp_path / "split" / "out" / "checkpoints" / "4"), "--output", str(tmp_path / "ema")])
    assert not (tmp_path / "ema").exists()

"""The run lock in gs:// (`GcsLockStore`) against fake-gcs-server on 127.0.0.1: conditional create, refresh, replace
and delete, their lost races, staleness judged on the server's clock, and a second training run refused."""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.error

import pytest
from test_checkpointing import CHILD_ENV, run_child, train_cmd, wait_for
from test_storage import _object_bytes
from test_train import ROOT

from uncond_flax import run_lock
from uncond_flax.run_lock import LOCK_NAME, GcsLockStore, Holder, LockHeld, RunLock, lock_store_for


def _lock_object(emulator, url: str) -> bytes | None:
    """The object's bytes as the server holds them (its JSON API, not the code under test), None if absent."""
    try:
        return _object_bytes(emulator, url)
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def _record(**changes) -> bytes:
    """A lock record as RunLock writes it, for a holder changed by `changes` (another host, a dead pid)."""
    return json.dumps(dataclasses.asdict(dataclasses.replace(Holder.this_process(), **changes))).encode()


def _race(calls: list) -> list:
    """Run the calls at the same moment, one thread each; their results in order (an exception is re-raised)."""
    barrier, results = threading.Barrier(len(calls)), [None] * len(calls)

    def run(i, call):
        barrier.wait()
        try:
            results[i] = call()
        except Exception as e:  # noqa: BLE001 -- handed to the test's thread
            results[i] = e

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


def test_each_operation_is_conditional_on_the_generation_seen(gcs_emulator, gcs_path):
    url = f"{gcs_path}/{LOCK_NAME}"
    ours, theirs = GcsLockStore(url), GcsLockStore(url)  # two runs, each with its own client
    assert ours.read() is None
    first = ours.create(b"ours")
    assert first is not None and _lock_object(gcs_emulator, url) == b"ours"
    assert theirs.create(b"theirs") is None and ours.create(b"ours again") is None
    data, version, heartbeat = theirs.read()
    assert (data, version) == (b"ours", first) and abs(time.time() - heartbeat) < 30

    renewed = ours.refresh(first)
    assert renewed not in (None, first) and theirs.read()[1] == renewed
    assert _lock_object(gcs_emulator, url) == b"ours"
    # The version they judged stale is gone: their takeover of it writes nothing.
    assert theirs.replace(b"theirs", first) is None and _lock_object(gcs_emulator, url) == b"ours"
    # Ours renewed under a newer generation (a retried beat whose first try landed): still ours, nothing written.
    assert ours.refresh(first) == renewed

    taken = theirs.replace(b"theirs", renewed)
    assert taken is not None and _lock_object(gcs_emulator, url) == b"theirs"
    # The old holder can neither renew nor release what is now theirs.
    assert ours.refresh(renewed) is None
    ours.delete(renewed)
    assert _lock_object(gcs_emulator, url) == b"theirs"
    theirs.delete(taken)
    assert _lock_object(gcs_emulator, url) is None and ours.read() is None


def test_of_runs_racing_to_create_exactly_one_wins(gcs_emulator, gcs_path):
    url = f"{gcs_path}/{LOCK_NAME}"
    stores = [GcsLockStore(url) for _ in range(6)]
    for round_ in range(3):
        results = _race([lambda s=s, i=i: s.create(f"run {i} round {round_}".encode()) for i, s in enumerate(stores)])
        winners = [i for i, version in enumerate(results) if version is not None]
        assert len(winners) == 1, results
        assert _lock_object(gcs_emulator, url) == f"run {winners[0]} round {round_}".encode()
        stores[winners[0]].delete(results[winners[0]])


def test_a_takeover_racing_a_refresh_one_wins(gcs_emulator, gcs_path):
    url = f"{gcs_path}/{LOCK_NAME}"
    holder, contender = GcsLockStore(url), GcsLockStore(url)
    for round_ in range(4):
        version = holder.create(b"holder")
        renewed, taken = _race([lambda: holder.refresh(version), lambda: contender.replace(b"contender", version)])
        assert (renewed is None) != (taken is None), (round_, renewed, taken)
        if taken is None:
            assert _lock_object(gcs_emulator, url) == b"holder"
            holder.delete(renewed)
        else:  # the holder learns it lost at its next beat, and its release leaves the new lock alone
            assert _lock_object(gcs_emulator, url) == b"contender"
            assert holder.refresh(version) is None
            holder.delete(version)
            assert _lock_object(gcs_emulator, url) == b"contender"
            contender.delete(taken)
        assert _lock_object(gcs_emulator, url) is None


def test_a_retried_upload_whose_first_try_landed_is_still_ours(gcs_emulator, gcs_path):
    # The client library retries a conditional upload after a transient error; if the first try had landed, the
    # retry fails its precondition against our own bytes. A second store sending the same bytes stands for it.
    url = f"{gcs_path}/{LOCK_NAME}"
    landed = GcsLockStore(url).create(b"ours, token 1")
    assert GcsLockStore(url).create(b"ours, token 1") == landed
    assert GcsLockStore(url).create(b"someone else") is None


def test_a_live_holder_is_refused_in_one_line_and_dead_or_silent_ones_are_taken_over(gcs_emulator, gcs_path, caplog):
    url = f"{gcs_path}/{LOCK_NAME}"
    first = RunLock(GcsLockStore(url), "output_dir X").acquire()
    with pytest.raises(LockHeld) as refused:
        RunLock(GcsLockStore(url), "output_dir X").acquire()
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(
        f"output_dir X is in use by another run (host {socket.gethostname()}, pid {os.getpid()}, since "
    ), message
    assert f"lock {url}); wait for it to end or choose another output_dir" in message
    first.release()
    assert _lock_object(gcs_emulator, url) is None  # released

    # A run on this machine that has exited: its pid says so, whatever the heartbeat.
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    store = GcsLockStore(url)
    store.create(_record(pid=child.pid))
    with caplog.at_level("WARNING", logger="uncond_flax"):
        lock = RunLock(GcsLockStore(url), "output_dir X").acquire()
    assert f"pid {child.pid} on this host has exited" in caplog.text
    lock.release()

    # A run on another machine: live while its heartbeat is fresh, taken over once it is silent for too long.
    version = store.create(_record(host="elsewhere", boot_id="other", pid=1))
    with pytest.raises(LockHeld, match=r"^output_dir X is in use by another run \(host elsewhere, pid 1, since "):
        RunLock(GcsLockStore(url), "output_dir X", stale_after_s=60).acquire()
    time.sleep(2.5)  # the server's Date has whole seconds: over 1 s whatever the rounding
    caplog.clear()
    with caplog.at_level("WARNING", logger="uncond_flax"):
        lock = RunLock(GcsLockStore(url), "output_dir X", stale_after_s=1).acquire()
    assert re.search(
        rf"took over the lock {url} of a dead run \(host elsewhere, pid 1, since .*: no heartbeat for [1-9] s\)",
        caplog.text,
    ), caplog.text
    assert json.loads(_lock_object(gcs_emulator, url))["token"] == lock.holder.token
    assert store.refresh(version) is None  # the silent run, should it wake, has lost it
    lock.release()


def _host_clock(monkeypatch, offset_s: float) -> None:
    """run_lock sees this host's clock `offset_s` away from the true time (hosts' clocks differ)."""
    skewed = types.ModuleType("time")
    skewed.__dict__.update(vars(time))
    skewed.time = lambda: time.time() + offset_s
    monkeypatch.setattr(run_lock, "time", skewed)


def test_heartbeat_age_is_judged_on_the_servers_clock_not_this_hosts(gcs_emulator, gcs_path, monkeypatch):
    url = f"{gcs_path}/{LOCK_NAME}"
    GcsLockStore(url).create(_record(host="elsewhere", boot_id="other", pid=1))
    # An hour fast: the fresh heartbeat must not look an hour old.
    _host_clock(monkeypatch, 3600)
    with pytest.raises(LockHeld, match=r"host elsewhere, pid 1"):
        RunLock(GcsLockStore(url), "output_dir X", stale_after_s=60).acquire()
    # An hour slow: a silent holder must not look alive for another hour.
    _host_clock(monkeypatch, -3600)
    time.sleep(2.5)  # the server's Date has whole seconds: over 1 s whatever the rounding
    RunLock(GcsLockStore(url), "output_dir X", stale_after_s=1).acquire().release()
    assert _lock_object(gcs_emulator, url) is None


def test_the_heartbeat_renews_the_lock_and_a_taken_over_run_leaves_the_new_lock(gcs_emulator, gcs_path):
    url = f"{gcs_path}/{LOCK_NAME}"
    store = GcsLockStore(url)
    lock = RunLock(store, "output_dir X", heartbeat_s=0.3).acquire()
    first = store.read()[1]
    deadline = time.time() + 30
    while store.read()[1] == first and time.time() < deadline:
        time.sleep(0.1)
    assert store.read()[1] != first, "the heartbeat did not renew the lock"

    # Another run judged this one dead and took the lock: the heartbeat notices, release leaves theirs alone.
    theirs = GcsLockStore(url)
    while (taken := theirs.replace(b"theirs", theirs.read()[1])) is None and time.time() < deadline:
        pass  # a beat came between our read and our write
    assert taken is not None
    while not lock.lost and time.time() < deadline:
        time.sleep(0.1)
    assert lock.lost
    lock.release()
    assert _lock_object(gcs_emulator, url) == b"theirs"

    # Released before its heartbeat could notice: the delete is conditional on the version it held.
    theirs.delete(taken)
    slow = RunLock(GcsLockStore(url), "output_dir X", heartbeat_s=3600).acquire()
    taken = theirs.replace(b"theirs", theirs.read()[1])
    slow.release()
    assert not slow.lost and _lock_object(gcs_emulator, url) == b"theirs"


def _child_error(code: str, env: dict) -> list[str]:
    child = (
        "import sys\n"
        f"{code}\n"
        "from uncond_flax import storage\n"
        "from uncond_flax.run_lock import lock_store_for\n"
        "try:\n    lock_store_for('gs://bkt/run/checkpoints')\n"
        "except storage.StorageError as e:\n    print(e); sys.exit(3)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", child], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3, result.stderr[-3000:]
    return result.stdout.strip().splitlines()


def test_a_gs_lock_without_its_package_or_credentials_is_one_line():
    env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
    lines = _child_error("sys.modules['google.cloud.storage'] = None", env)  # unimportable in the child only
    assert lines == [
        "gs://bkt/run/checkpoints/run.lock needs the google-cloud-storage package, which is not installed: "
        "pip install 'uncond-flax[gcs]' or pip install google-cloud-storage"
    ]
    lines = _child_error("", {**env, "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/key.json"})
    assert len(lines) == 1 and lines[0].startswith("the run lock gs://bkt/run/checkpoints/run.lock needs Google "), (
        lines
    )
    assert "/nonexistent/key.json" in lines[0] and "gcloud auth application-default login" in lines[0]
    assert lock_store_for("s3://bkt/run/checkpoints") is None  # no store there yet: the run warns


def test_a_second_training_run_in_the_same_bucket_folder_stops_with_one_line(tmp_path, gcs_emulator, gcs_path):
    run = f"{gcs_path}/run"
    lock_url = f"{run}/checkpoints/{LOCK_NAME}"
    env = {**CHILD_ENV, **gcs_emulator.client_env()}  # CHILD_ENV was taken before the fixture set these
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(
            train_cmd(run, "--config.max_train_steps=100000", "--config.checkpointing_steps=1000"),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: _lock_object(gcs_emulator, lock_url) is not None, first, 120, "the first run's lock")
        second = run_child(train_cmd(run, "--config.max_train_steps=2"), env=env)
        assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(
            f"train_flax.py: error: output_dir {run} is in use by another run (host {socket.gethostname()}, "
            f"pid {first.pid}, since "
        ), second.stderr[-3000:]
        assert last.endswith(f"lock {lock_url}); wait for it to end or choose another output_dir"), last
        assert first.poll() is None, "the first run must go on"
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 75, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert _lock_object(gcs_emulator, lock_url) is None  # released on exit

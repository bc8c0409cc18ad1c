"""Two real processes (gloo) deciding from storage: process 0 reads and decides for both, and a local output_dir
that is not shared between them is refused at start. (A run in a bucket with each process in a folder of its own:
tests/test_multihost.py.)"""

import json
import os
import subprocess
import sys

from test_multihost import BASE_ENV, _free_port, outputs_of, start_pair
from test_train import ROOT


def test_two_processes_with_different_local_output_dirs_stop_before_compiling(tmp_path):
    dirs = (tmp_path / "host0", tmp_path / "host1")
    procs = start_pair(dirs, "--config.max_train_steps=4", stderr=subprocess.PIPE)
    results = outputs_of(procs, timeout=300)
    for i, (p, (out, err)) in enumerate(zip(procs, results)):
        assert p.returncode not in (0, None), f"process {i} did not fail: {out[-2000:]}{err[-2000:]}"
        last = err.strip().splitlines()[-1]
        assert last.endswith(
            f"error: output_dir {dirs[0] if i == 0 else dirs[1]} is not shared between the 2 processes (process 1 "
            "does not see process 0's files): multi-host runs need storage all hosts see (gs://…, NFS)"
        ), f"process {i}: {err[-3000:]}"
        assert "train step compiled" not in out + err
    assert os.listdir(dirs[0]) == os.listdir(dirs[1]) == []  # the token is gone, and nothing else was written


def test_process_0_decides_for_all_and_a_failure_anywhere_is_everyones(tmp_path):
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests/fixtures/agree.py"), f"127.0.0.1:{port}", str(i), tmp_path],
            env={**BASE_ENV, "JAX_NUM_CPU_DEVICES": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = outputs_of(procs, timeout=300)
    assert [p.returncode for p in procs] == [0, 0], results[0][1][-2000:] + results[1][1][-2000:]
    seen = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    for answer in seen:
        assert answer["value_pid"] == seen[0]["pid"]  # process 0's answer, on both
        assert answer["types"] == ["tuple", "int"]  # exactly what process 0 returned
        assert answer["error"] == "checkpoint 8 is damaged (seen by process 0)"  # its exception, on both
        assert answer["failure"] == "cannot read shard 3 (on process 1)"
        assert answer["no_failure"] is None
    assert seen[0]["ran_decide"] == [0] and seen[1]["ran_decide"] == []  # only process 0 read anything
    assert os.listdir(tmp_path) == []  # a folder both see passed the shared-storage check, which left nothing

"""Multi-host start: which launches join a cluster (checked against JAX's own cluster detection, with the launchers'
environment variables set in subprocesses and a metadata server on 127.0.0.1 for Cloud TPU VMs), and the one-line
errors of real processes whose peers never come."""

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from typing import ClassVar

import pytest

from uncond_flax import parallel

from test_train import ROOT

TRAIN = os.path.join(ROOT, "train_flax.py")
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny_digits.py")
_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES")
_LAUNCHER_PREFIXES += ("JAX_PROCESS_ID", "GCE_METADATA", "KUBERNETES_")
BASE_ENV = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
BASE_ENV.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")

# For each environment given (as JSON), our detection next to the cluster class JAX 0.10 would pick (TPU classes
# only where JAX takes this machine for a TPU VM, as both go to the network otherwise). One process, environments
# set in turn: JAX's classes and ours read os.environ at call time.
_DETECT = """
import json, os, sys
import jax
from jax._src.clusters import SlurmCluster, OmpiCluster, GkeTpuCluster, GceTpuCluster
from uncond_flax.parallel import detect_cluster
base = dict(os.environ)
base.pop("TPU_SKIP_MDS_QUERY", None)  # JAX sets it at import when it sees no TPU chips
candidates = [SlurmCluster, OmpiCluster] + ([GkeTpuCluster, GceTpuCluster] if base.get("JAX_FORCE_TPU_INIT") else [])
found = []
for env in json.loads(sys.argv[1]):
    os.environ.clear()
    os.environ.update({**base, **env})
    ours = detect_cluster()
    theirs = next((c for c in candidates if c.is_env_present()), None)
    found.append({
        "ours": None if ours is None else [ours.name, ours.num_processes, ours.process_id, ours.detected_by_jax],
        "jax": None if theirs is None else [theirs.name, theirs.get_process_count(), theirs.get_process_id()],
    })
print(json.dumps(found))
"""


def _detect(envs: list[dict], **process_env) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-c", _DETECT, json.dumps(envs)],
        env={**BASE_ENV, **process_env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


_SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_LOCALID": "0"}
# JAX_FORCE_TPU_INIT makes JAX take this machine for a TPU VM; the slice variables keep JAX off the metadata server.
_GKE = {"MEGASCALE_NUM_SLICES": "1", "MEGASCALE_SLICE_ID": "0"}
# (environment, what we find: [name, processes, id, JAX finds the coordinator], the JAX class that agrees)
_LAUNCHES = [
    ({}, None, None),
    ({**_SLURM, "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}, ["SLURM", 4, 2, True], "slurm"),
    ({**_SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, ["SLURM", 1, 0, True], "slurm"),
    # An sbatch script run without srun: the job has 2 tasks, but this is its one batch process.
    ({"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, None, None),
    (
        {
            "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911",
            "OMPI_COMM_WORLD_SIZE": "3",
            "OMPI_COMM_WORLD_RANK": "1",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        },
        ["Open MPI", 3, 1, True],
        "ompi",
    ),
    # Open MPI 5 (PRRTE) no longer sets OMPI_MCA_orte_hnp_uri: JAX cannot find the coordinator there.
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, ["Open MPI", 2, 0, False], None),
    (
        {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
        ["JAX_COORDINATOR_ADDRESS", 2, 1, False],
        None,
    ),
]
# A TPU VM on GKE: the hosts come from environment variables.
_GKE_LAUNCHES = [
    ({**_GKE, "TPU_WORKER_HOSTNAMES": "t0,t1", "TPU_WORKER_ID": "1"}, ["Cloud TPU", 2, None, True], "gketpu"),
    ({**_GKE, "TPU_WORKER_HOSTNAMES": "t0", "TPU_WORKER_ID": "0"}, ["Cloud TPU", 1, None, True], "gketpu"),
]


def _assert_agree(found, launches):
    assert len(found) == len(launches)
    for got, (env, ours, jax_name) in zip(found, launches):
        assert got["ours"] == ours, env
        if jax_name is None:
            assert got["jax"] is None, env
        else:
            assert got["jax"][0] == jax_name, env
            assert got["jax"][1] == ours[1], env  # the same number of processes
            assert ours[2] is None or got["jax"][2] == ours[2], env


def test_detection_agrees_with_jax():
    _assert_agree(_detect([env for env, _, _ in _LAUNCHES]), _LAUNCHES)


def test_detection_on_a_gke_tpu_vm_agrees_with_jax():
    _assert_agree(_detect([env for env, _, _ in _GKE_LAUNCHES], JAX_FORCE_TPU_INIT="1"), _GKE_LAUNCHES)


class _Metadata(http.server.BaseHTTPRequestHandler):
    """The GCE metadata server's instance attributes, as a TPU VM of a 2-slice pod of 4 hosts each sees them."""

    attributes: ClassVar[dict[str, str]] = {
        "agent-worker-number": "3",
        "worker-network-endpoints": "w0:uid0:10.0.0.2,w1:uid1:10.0.0.3,w2:uid2:10.0.0.4,w3:uid3:10.0.0.5",
        "tpu-env": "ACCELERATOR_TYPE: 'v4-32'\nMEGASCALE_NUM_SLICES: '2'\nMEGASCALE_SLICE_ID: '1'\n",
    }

    def do_GET(self):  # the http.server API
        key = self.path.rsplit("/", 1)[-1]
        ok = self.path.startswith("/computeMetadata/v1/instance/attributes/") and key in self.attributes
        ok = ok and self.headers.get("Metadata-Flavor") == "Google"
        body = (self.attributes[key] if ok else "not found").encode()
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def metadata_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_tpu_pod_slice_is_read_from_the_metadata_server_like_jax(metadata_server):
    (found,) = _detect([{}], JAX_FORCE_TPU_INIT="1", GCE_METADATA_IP=metadata_server)
    assert found["ours"] == ["Cloud TPU", 8, None, True]
    assert found["jax"] == ["gcetpu", 8, 7]  # worker 3 of slice 1


def test_single_host_tpu_vm_stays_one_process(metadata_server, monkeypatch):
    monkeypatch.setitem(_Metadata.attributes, "worker-network-endpoints", "w0:uid0:10.0.0.2")
    monkeypatch.setitem(_Metadata.attributes, "tpu-env", "ACCELERATOR_TYPE: 'v5litepod-8'\n")
    env = {"JAX_FORCE_TPU_INIT": "1", "GCE_METADATA_IP": metadata_server}
    assert _detect([{}], **env)[0]["ours"] == ["Cloud TPU", 1, None, True]
    # distributed=auto on that VM: no jax.distributed, one process.
    code = (
        "import os, jax; os.environ.pop('TPU_SKIP_MDS_QUERY', None)\n"
        "from uncond_flax.parallel import initialize_distributed\n"
        "initialize_distributed('auto'); print(jax.distributed.is_initialized(), jax.process_count())"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env={**BASE_ENV, **env}, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.split() == ["False", "1"], result.stderr


def test_unreachable_tpu_metadata_is_a_one_line_error():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import os, jax; os.environ.pop('TPU_SKIP_MDS_QUERY', None)\n"
        "from uncond_flax.parallel import detect_cluster\n"
        "try:\n    detect_cluster()\nexcept ValueError as e:\n    print(e)"
    )
    env = {**BASE_ENV, "JAX_FORCE_TPU_INIT": "1", "GCE_METADATA_IP": f"127.0.0.1:{port}"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "--config.distributed=False" in lines[0], result


def test_distributed_mode_accepts_auto_true_false():
    assert [parallel.distributed_mode(v) for v in ("auto", "AUTO", True, "true", "False", False)] == [
        "auto",
        "auto",
        True,
        True,
        False,
        False,
    ]
    for bad in ("yes", None, 1):
        with pytest.raises(ValueError, match="use auto"):
            parallel.distributed_mode(bad)
    with pytest.raises(ValueError, match="distributed=False but coordinator_address=h:1"):
        parallel.initialize_distributed(False, "h:1")
    with pytest.raises(ValueError, match="distributed_timeout_s=0"):
        parallel.initialize_distributed(True, "h:1", 2, 0, timeout_s=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, TRAIN, f"--config={TINY}", *args],
        env={**BASE_ENV, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_distributed_true_off_cluster_is_one_line(tmp_path):
    result = _train(f"--config.output_dir={tmp_path}", "--config.distributed=True")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "train_flax.py: error: distributed=True but this is no multi-process launch (a TPU pod slice, SLURM with "
        "several tasks, Open MPI, or JAX_COORDINATOR_ADDRESS): on one host use distributed=auto; elsewhere set "
        "--config.coordinator_address=HOST:PORT --config.num_processes=N --config.process_id=I"
    )


@pytest.mark.parametrize(
    "args, env, message",
    [
        (
            ("auto", "127.0.0.1:1234"),
            {},
            "coordinator_address=127.0.0.1:1234 but the number of processes and this process's id are unknown",
        ),
        (
            ("auto",),
            {"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1"},
            "Open MPI with 2 processes, but JAX cannot find its coordinator there",
        ),
        (
            (True,),
            {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1234"},
            "JAX_COORDINATOR_ADDRESS is set but the number of processes and this process's id are unknown",
        ),
    ],
)
def test_incomplete_launch_settings_are_errors_before_joining(monkeypatch, args, env, message):
    for key in os.environ:
        if key.startswith(_LAUNCHER_PREFIXES):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parallel.initialize_distributed(*args)


_JOIN = (
    "import sys\nfrom uncond_flax.parallel import initialize_distributed\n"
    "initialize_distributed('auto', *sys.argv[1:2], *map(int, sys.argv[2:]), timeout_s=3)"
)


def _never_joined(address: str, process_id: int) -> str:
    return (
        f"-c: error: distributed: process {process_id} of 2 did not meet all processes at the coordinator {address} "
        "within 3 s: start the same command on every host (process 0 runs the coordinator), check that this host "
        "reaches that address, or raise --config.distributed_timeout_s"
    )


def test_a_peer_that_never_joins_is_a_one_line_error_naming_the_coordinator(tmp_path):
    # Process 0 runs the coordinator and waits for process 1 (through the trainer's command line); process 1 waits
    # for a coordinator that never starts.
    address = f"127.0.0.1:{_free_port()}"
    start = time.time()
    result = _train(
        f"--config.output_dir={tmp_path}",
        f"--config.coordinator_address={address}",
        "--config.num_processes=2",
        "--config.process_id=0",
        "--config.distributed_timeout_s=3",
    )
    assert time.time() - start < 120  # JAX's own deadline is 60 s later, and then it aborts with a stack trace
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == _never_joined(address, 0).replace("-c:", "train_flax.py:", 1)
    assert "Check failure" not in result.stderr and "Traceback" not in result.stderr

    address = f"127.0.0.1:{_free_port()}"
    result = subprocess.run(
        [sys.executable, "-c", _JOIN, address, "2", "1"], env=BASE_ENV, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1 and result.stderr.strip().splitlines()[-1] == _never_joined(address, 1), result


def test_slurm_coordinator_derived_by_jax_is_named_when_peers_never_join():
    # JAX derives the coordinator from the job: the first node of SLURM_STEP_NODELIST, port 61440 + job id % 4096.
    job_id = next(j for j in range(5000, 9096) if _port_is_free(61440 + j % 4096))
    env = {**_SLURM, "SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "127.0.0.1", "SLURM_NTASKS": "2"}
    result = subprocess.run(
        [sys.executable, "-c", _JOIN],
        env={**BASE_ENV, **env, "SLURM_PROCID": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == _never_joined(f"127.0.0.1:{61440 + job_id % 4096}", 1)


def _port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_two_processes_join_from_jax_coordinator_address_and_our_env_vars():
    address = f"127.0.0.1:{_free_port()}"
    code = (
        "import jax\nfrom uncond_flax.parallel import initialize_distributed\n"
        "initialize_distributed('auto', timeout_s=60)\nprint(jax.process_index(), jax.process_count())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={**BASE_ENV, "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i)},
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [out.split()[-2:] for out, _ in outputs] == [["0", "2"], ["1", "2"]]

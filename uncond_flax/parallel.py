"""Device mesh and shardings: the batch is split over every device, params are replicated or FSDP-sharded."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import sys
import threading
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from uncond_flax import storage

logger = logging.getLogger(__name__)

T = TypeVar("T")

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)


def distributed_mode(value: Any) -> str | bool:
    """The `distributed` field as "auto", True or False (config files and overrides may give strings)."""
    if isinstance(value, bool):
        return value
    mode = {"auto": "auto", "true": True, "false": False}.get(str(value).lower()) if isinstance(value, str) else None
    if mode is None:
        raise ValueError(f"distributed={value!r}: use auto (join a cluster when one is found), True or False")
    return mode


@dataclasses.dataclass(frozen=True)
class Cluster:
    """A multi-process launch found in the environment.

    `detected_by_jax`: `jax.distributed.initialize()` finds its coordinator, size and rank itself; otherwise
    `num_processes` / `process_id` are what we pass it.
    """

    name: str
    num_processes: int | None
    process_id: int | None = None
    detected_by_jax: bool = True


def detect_cluster(environ: Mapping[str, str] | None = None) -> Cluster | None:
    """The launch this process is part of (TPU pod slice, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS), else None.

    Reads environment variables only, except on a Cloud TPU VM, where the worker list comes from the VM's
    metadata server as in JAX's own detection; a v4-8 / v5e-8 VM is a cluster of one.
    """
    env = os.environ if environ is None else environ
    # The variables JAX's SlurmCluster needs: a batch script run without `srun` has SLURM_NTASKS but no step.
    if all(k in env for k in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")):
        return Cluster("SLURM", int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]))
    if "OMPI_COMM_WORLD_SIZE" in env:
        size, rank = int(env["OMPI_COMM_WORLD_SIZE"]), int(env.get("OMPI_COMM_WORLD_RANK", 0))
        # JAX finds Open MPI's coordinator through OMPI_MCA_orte_hnp_uri, which Open MPI 5 (PRRTE) no longer sets.
        return Cluster("Open MPI", size, rank, detected_by_jax="OMPI_MCA_orte_hnp_uri" in env)
    tpu = _tpu_cluster(env)
    if tpu is not None:
        return tpu
    if env.get("JAX_COORDINATOR_ADDRESS"):
        # JAX reads JAX_COORDINATOR_ADDRESS but takes the size and rank only from a known cluster or its arguments;
        # JAX_NUM_PROCESSES / JAX_PROCESS_ID are ours, for launchers JAX does not know (Kubernetes jobs, scripts).
        count, rank = env.get("JAX_NUM_PROCESSES"), env.get("JAX_PROCESS_ID")
        return Cluster(
            "JAX_COORDINATOR_ADDRESS",
            None if count is None else int(count),
            None if rank is None else int(rank),
            detected_by_jax=False,
        )
    return None


def _tpu_cluster(env: Mapping[str, str]) -> Cluster | None:
    # JAX decides once, at import, whether this is a Cloud TPU VM (TPU chips on PCI and libtpu installed); off a
    # TPU VM we never touch the network.
    from jax._src import cloud_tpu_init

    if not cloud_tpu_init.running_in_cloud_tpu_vm:
        return None
    slices = env.get("MEGASCALE_NUM_SLICES")
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")  # GKE sets these
    if hosts is None:
        if "TPU_SKIP_MDS_QUERY" in env:
            return None
        hosts = _tpu_metadata(env, "worker-network-endpoints")
        if slices is None:
            tpu_env = dict(line.split(":", 1) for line in _tpu_metadata(env, "tpu-env").splitlines() if ":" in line)
            slices = tpu_env.get("MEGASCALE_NUM_SLICES", "1").strip().strip("'")
    return Cluster("Cloud TPU", len(hosts.split(",")) * int(slices or 1))


def _tpu_metadata(env: Mapping[str, str], key: str) -> str:
    host = env.get("GCE_METADATA_IP", "metadata.google.internal")  # the variable JAX and google-auth honour
    url = f"http://{host}/computeMetadata/v1/instance/attributes/{key}"
    try:
        request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read().decode()
    except OSError as e:
        raise ValueError(
            f"distributed=auto: this Cloud TPU VM's metadata ({url}) did not answer ({e}); "
            "set --config.distributed=False on a single host or True on a pod slice"
        ) from None


def initialize_distributed(
    mode: str | bool = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> None:
    """Join a multi-process run with `jax.distributed` (before any other JAX call) when `mode` asks for it.

    "auto": join when `coordinator_address` is given or `detect_cluster` finds more than one process; True: join
    or raise ValueError; False: stay one process. Peers that have not all joined after `timeout_s` end the
    process with a one-line error naming the coordinator (JAX itself would abort with a stack trace).
    """
    mode = distributed_mode(mode)
    if jax.distributed.is_initialized():
        return
    if mode is False:
        if coordinator_address is not None:
            raise ValueError(f"distributed=False but coordinator_address={coordinator_address}: drop one of them")
        return
    if not isinstance(timeout_s, int) or timeout_s < 1:
        raise ValueError(f"distributed_timeout_s={timeout_s!r}: must be a whole number of seconds >= 1")
    cluster = detect_cluster()
    if coordinator_address is None and (cluster is None or (mode == "auto" and cluster.num_processes == 1)):
        if mode == "auto":
            return
        raise ValueError(
            "distributed=True but this is no multi-process launch (a TPU pod slice, SLURM with several tasks, "
            "Open MPI, or JAX_COORDINATOR_ADDRESS): on one host use distributed=auto; elsewhere set "
            "--config.coordinator_address=HOST:PORT --config.num_processes=N --config.process_id=I"
        )
    if cluster is not None and not cluster.detected_by_jax:
        num_processes = cluster.num_processes if num_processes is None else num_processes
        process_id = cluster.process_id if process_id is None else process_id
    if (cluster is None or not cluster.detected_by_jax) and None in (num_processes, process_id):
        where = f"{cluster.name} is set" if cluster else f"coordinator_address={coordinator_address}"
        env_hint = " (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)" if cluster else ""
        raise ValueError(
            f"distributed: {where} but the number of processes and this process's id are unknown: set "
            f"--config.num_processes and --config.process_id{env_hint}"
        )
    if cluster is not None and not cluster.detected_by_jax and coordinator_address is None:
        coordinator_address = os.environ.get("JAX_COORDINATOR_ADDRESS")
        if coordinator_address is None:
            raise ValueError(
                f"distributed: {cluster.name} with {cluster.num_processes} processes, but JAX cannot find its "
                "coordinator there: set JAX_COORDINATOR_ADDRESS or --config.coordinator_address to HOST:PORT of "
                "the host of process 0"
            )
    watchdog = threading.Timer(timeout_s, _give_up_joining, args=(timeout_s,))
    watchdog.daemon = True
    watchdog.start()
    try:
        # JAX's own deadline aborts the process (a C++ fatal error, no exception); ours fires first.
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout_s + 60,
        )
    finally:
        watchdog.cancel()
    logger.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def _give_up_joining(timeout_s: int) -> None:
    # Runs on a timer thread while the main thread waits inside JAX's connect (which releases the GIL).
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    sys.stderr.write(
        f"{os.path.basename(sys.argv[0])}: error: distributed: process {state.process_id} of {state.num_processes} "
        f"did not meet all processes at the coordinator {state.coordinator_address} within {timeout_s} s: start the "
        "same command on every host (process 0 runs the coordinator), check that this host reaches that address, "
        "or raise --config.distributed_timeout_s\n"
    )
    sys.stderr.flush()
    os._exit(1)


def join_cluster(config: Any) -> None:
    """`initialize_distributed` with the config's `distributed`, `coordinator_address`, `num_processes`,
    `process_id` and `distributed_timeout_s` (a second call does nothing)."""
    initialize_distributed(
        config.distributed,
        config.coordinator_address,
        config.num_processes,
        config.process_id,
        timeout_s=config.distributed_timeout_s,
    )


def make_mesh(fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A 2-D mesh (data, fsdp) over all devices of all processes; `fsdp` devices share one param copy."""
    devices = jax.devices() if devices is None else list(devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise ValueError(f"fsdp={fsdp} must be >= 1 and divide the number of devices ({len(devices)})")
    grid = np.asarray(devices).reshape(len(devices) // fsdp, fsdp)
    return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
    return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int = 2**12) -> P:
    """Shard the largest axis divisible by `fsdp` over the fsdp axis; small or indivisible arrays stay replicated."""
    if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP_AXIS
            return P(*spec)
    return P()


def state_shardings(abstract_tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree of arrays/ShapeDtypeStructs: FSDP over `mesh`'s fsdp axis, else replicated."""
    fsdp = mesh.shape[FSDP_AXIS]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(getattr(x, "shape", ())), fsdp)), abstract_tree)


def is_main_process() -> bool:
    return jax.process_index() == 0


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy on every process (a collective: all processes must call it together)."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(fetch, tree)


def broadcast_bytes(data: bytes | None, is_source: bool) -> bytes:
    """The source process's `data` on every process (a collective; the others pass None)."""
    from jax.experimental import multihost_utils

    size = int(multihost_utils.broadcast_one_to_all(np.int32(len(data) if is_source else 0), is_source=is_source))
    # A power-of-two buffer: one compiled broadcast per size class rather than one per length.
    buffer = np.zeros(max(256, 1 << (size - 1).bit_length()), np.uint8)
    if is_source:
        buffer[:size] = np.frombuffer(data, np.uint8)
    return multihost_utils.broadcast_one_to_all(buffer, is_source=is_source)[:size].tobytes()


_deciding = threading.local()


def process_0_decides(decide: Callable[[], T]) -> T:
    """`decide()` run by process 0 alone; its result, or the exception it raised, becomes every process's.

    For choices all processes must make alike that read storage (is there a checkpoint, which step, with what
    config): one reader, so hosts that see different files cannot disagree. A collective: every process calls it
    at the same point. With one process, or inside another decision, it is just `decide()`.
    """
    if jax.process_count() == 1 or getattr(_deciding, "active", False):
        return decide()
    payload = error = None
    if jax.process_index() == 0:
        _deciding.active = True
        try:
            ok, value = True, decide()
        except Exception as e:  # noqa: BLE001 -- any failure must reach the others, or they wait here forever
            ok, value, error = False, e, e
        finally:
            _deciding.active = False
        try:
            inner = pickle.dumps(value)
        except Exception as e:  # noqa: BLE001 -- an unpicklable result is a bug; say so on every process
            ok, inner = False, pickle.dumps(TypeError(f"process_0_decides: cannot send {type(value).__name__}: {e}"))
        text = f"{type(value).__name__}: {value}" if not ok else ""
        payload = pickle.dumps((ok, text, inner))
    # pickle, not JSON: the other processes get exactly the types process 0 has (tuples, int keys, exception
    # classes). Only this job's own processes take part in the broadcast.
    ok, text, inner = pickle.loads(broadcast_bytes(payload, is_source=jax.process_index() == 0))
    if error is not None:
        raise error  # process 0 raises its own exception, with its traceback
    try:
        value = pickle.loads(inner)
    except Exception:  # noqa: BLE001 -- an exception class whose constructor takes more than a message
        value = RuntimeError(f"process 0: {text}")
    if not ok:
        raise value
    return value


def first_failure(error: str | None) -> str | None:
    """After work every process does on its own share: the first failing process's `error` (each passes its own,
    None for success), or None if none failed. One answer for all (a collective)."""
    if jax.process_count() == 1:
        return error
    from jax.experimental import multihost_utils

    failed = np.asarray(multihost_utils.process_allgather(np.int32(error is not None))).reshape(-1)
    if not failed.any():
        return None
    first = int(np.argmax(failed))
    source = jax.process_index() == first
    text = broadcast_bytes(error.encode() if source else None, is_source=source).decode()
    return text if first == 0 else f"{text} (on process {first})"


def check_shared_dir(path: str, what: str = "output_dir") -> None:
    """With several processes and a local `path`, stop (StorageError, one line) unless every process sees the
    files process 0 writes there. A collective; nothing to check for one process or a URL (`gs://`).

    Without shared storage each host would keep its own checkpoints and decide alone whether to resume.
    """
    if jax.process_count() == 1 or storage.is_remote(path):
        return

    def write_token() -> str:
        # A new random name each run: a token left by an earlier run on one host's own disk cannot pass for it.
        nonce = uuid.uuid4().hex
        storage.write_text(storage.join(path, f".uncond_flax_shared_check_{nonce}"), nonce)
        return nonce

    nonce = process_0_decides(write_token)  # the broadcast is the barrier: the file exists before anyone looks
    token = storage.join(path, f".uncond_flax_shared_check_{nonce}")
    try:
        seen = storage.read_text(token) == nonce
    except OSError:
        seen = False
    from jax.experimental import multihost_utils

    # Also the barrier after which process 0 removes the token.
    blind = np.flatnonzero(np.asarray(multihost_utils.process_allgather(np.int32(not seen))).reshape(-1))
    if jax.process_index() == 0:
        storage.remove(token)
    if blind.size:
        raise storage.StorageError(
            f"{what} {path} is not shared between the {jax.process_count()} processes (process {blind[0]} does "
            f"not see process 0's files): multi-host runs need storage all hosts see (gs://…, NFS)"
        )

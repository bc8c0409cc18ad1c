"""JAX's persistent compilation cache, on by default, with a log line whenever a program comes from it.

A second start of the same run (a resume, or the same command again) then loads its compiled train step and
sampler from disk instead of compiling them. The default location is the user's cache directory, never
`output_dir`: outputs may live on `gs://` and be shared, and a compilation cache must stay trusted.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import pickle
import platform
import sys
import threading
import time
from typing import Any, Callable

import jax
from jax import monitoring

from uncond_flax.errors import one_line

logger = logging.getLogger(__name__)

AUTO = "auto"
_HIT_EVENT = "/jax/compilation_cache/compile_time_saved_sec"
_HITS_EVENT = "/jax/compilation_cache/cache_hits"
_listening = False
_hits = threading.local()  # JAX's cache hits seen by each thread


def default_cache_dir() -> str:
    """`$XDG_CACHE_HOME/uncond_flax/jax`, or `~/.cache/uncond_flax/jax`."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "uncond_flax", "jax")


def _log_hit(event: str, duration_secs: float, **_: object) -> None:
    # JAX records this once per program read from the persistent cache (and never on a miss).
    if event == _HIT_EVENT:
        logger.info(
            "compiled program loaded from the persistent compilation cache in %s (%.1fs of compiling saved)",
            jax.config.jax_compilation_cache_dir,
            duration_secs,
        )


def enable_compile_cache(value: str | None = AUTO) -> str | None:
    """Turn on the persistent compilation cache (the `compilation_cache_dir` config field); returns its directory.

    "auto": the directory JAX already has (JAX_COMPILATION_CACHE_DIR), else `default_cache_dir()`; a path or
    `gs://` URL: that; None or "": leave JAX's own setting alone (off unless JAX_COMPILATION_CACHE_DIR is set).
    Call it before the first compile. Cache hits are logged at INFO by this module's logger; a directory that
    cannot be created is a warning, and the run goes on without the cache.
    """
    global _listening
    if not value:
        return jax.config.jax_compilation_cache_dir
    path = (jax.config.jax_compilation_cache_dir or default_cache_dir()) if value == AUTO else value
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:  # a read-only home must not stop a run: the cache only saves time
            logger.warning("compilation cache off: cannot create %s (%s); set compilation_cache_dir", path, e)
            return None
    jax.config.update("jax_compilation_cache_dir", path)
    if not _listening:
        monitoring.register_event_duration_secs_listener(_log_hit)
        _listening = True
    logger.info("persistent compilation cache: %s", path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Whole compiled programs. JAX's cache above is keyed by the lowered program, so a second start still traces and
# lowers the train step before the cache can answer: for the default UNet ~5 of the ~9 s it takes. A program
# kept here is keyed by everything the trace reads instead (this package's source, the library versions, the
# host's CPU, JAX's and XLA's settings, the devices, and what the caller says the program depends on), and is
# loaded without tracing. Like JAX's own cache it is trusted: loading an executable runs what it holds.

EXECUTABLES_SUBDIR = "uncond_flax_executables"
KEEP_PER_PROGRAM = 8  # the programs used last are kept, per name; older ones are deleted
_FORMAT = 1
_VERSIONED = (
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "numpy",
    "ml_dtypes",
    "libtpu",
    "jax-cuda12-plugin",
    "jax-cuda12-pjrt",
    "jax-cuda13-plugin",
    "jax-cuda13-pjrt",
)
_ENV_PREFIXES = ("XLA_", "JAX_", "LIBTPU", "TPU_", "NVIDIA_TF32")


def executables_dir() -> str | None:
    """Where compiled programs are kept: `uncond_flax_executables/` in JAX's cache directory when that cache is on
    and a local folder, and this is the only process (each of several processes would have to load the same
    program); else None."""
    cache = jax.config.jax_compilation_cache_dir
    if not cache or not jax.config.jax_enable_compilation_cache or "://" in cache or jax.process_count() > 1:
        return None
    return os.path.join(cache, EXECUTABLES_SUBDIR)


def _host_cpu() -> str:
    # XLA:CPU compiles for the CPU it runs on: a cache folder shared between machines must not cross CPUs.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def source_digest(package: str) -> str:
    """sha256 of the `.py` files under `package` (their paths and contents): an edited file is another program."""
    digest = hashlib.sha256()
    for folder, dirs, files in os.walk(package):
        dirs.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            digest.update(os.path.relpath(path, package).encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read() + b"\0")
    return digest.hexdigest()


@functools.cache
def _installation() -> dict[str, Any]:
    """What a process cannot change: this package's source, the library versions, Python, the host's CPU."""
    versions = {}
    for dist in _VERSIONED:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    source = source_digest(os.path.dirname(os.path.abspath(__file__)))
    return {"source": source, "versions": versions, "python": sys.version, "cpu": _host_cpu()}


def describe_avals(tree: Any) -> dict[str, Any]:
    """`tree`'s structure and its leaves' shapes and dtypes, as text (arrays or ShapeDtypeStructs; values unread)."""
    leaves, structure = jax.tree.flatten(tree)
    return {"tree": str(structure), "avals": [(tuple(x.shape), str(x.dtype)) for x in leaves]}


def program_key(name: str, args: Any, shardings: Any, inputs: Any) -> str:
    """The hex digest a compiled program is kept under: `args` (their tree, shapes and dtypes), `shardings`
    (the jit's in_shardings, with their devices), the caller's `inputs` (JSON-able: what else the traced
    function reads), and the process's JAX settings, XLA environment, devices and installation."""
    placements = []
    for sharding in jax.tree.leaves(shardings):
        mesh = getattr(sharding, "mesh", None)
        devices = mesh.device_ids.tolist() if mesh is not None else sorted(d.id for d in sharding.device_set)
        placements.append((str(sharding), devices))
    described = {
        "format": _FORMAT,
        "name": name,
        "args": describe_avals(args),
        "shardings": placements,
        "inputs": inputs,
        "jax_config": sorted(jax.config.values.items()),
        "env": sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)),
        "devices": [
            (d.id, d.platform, d.device_kind, d.process_index, str(getattr(d, "coords", ""))) for d in jax.devices()
        ],
        "backend": jax.devices()[0].client.platform_version,
        "installation": _installation(),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode()).hexdigest()


def _load(path: str, key: str, args: Any) -> tuple[jax.stages.Compiled, dict[str, Any]]:
    from jax.experimental.serialize_executable import deserialize_and_load

    with open(path, "rb") as f:
        record = pickle.load(f)
    if record.get("format") != _FORMAT or record.get("key") != key:
        raise ValueError("it holds another program")
    if record["in_tree"] != jax.tree.structure((args, {})):
        raise ValueError("its arguments have another structure")
    by_id = {d.id: d for d in jax.devices()}
    # The devices it was compiled for, in its order (the default would be every device, in the backend's order).
    devices = [by_id[i] for i in record["devices"]]
    compiled = deserialize_and_load(
        record["executable"], record["in_tree"], record["out_tree"], execution_devices=devices
    )
    for info, arg in zip(jax.tree.leaves(compiled.args_info), jax.tree.leaves(args), strict=True):
        if info.shape != arg.shape or info.dtype != arg.dtype:
            raise ValueError(f"it takes {info.dtype}{list(info.shape)} where {arg.dtype}{list(arg.shape)} is given")
    os.utime(path)  # recently used: kept by the pruning below
    return compiled, record["info"]


def _serialize(compiled: jax.stages.Compiled, served: tuple[Any, bytes] | None) -> tuple[bytes, Any, Any]:
    """`jax.experimental.serialize_executable.serialize(compiled)`; for a program JAX's cache served (`served`: the
    executable it loaded and the bytes it loaded it from), with those bytes in place of the executable's own."""
    from jax.experimental import serialize_executable

    if served is None:
        return serialize_executable.serialize(compiled)
    unloaded = compiled._executable._unloaded_executable  # what `serialize` pickles, as it does
    loaded, data = served

    class Pickler(serialize_executable._JaxPjrtPickler):
        def persistent_id(self, obj: Any) -> Any:
            return ("exec", data) if obj is loaded else super().persistent_id(obj)

    args_info, in_tree = jax.tree_util.tree_flatten(compiled.args_info)
    with io.BytesIO() as f:
        Pickler(f).dump((unloaded, args_info, compiled._no_kwargs))
        return f.getvalue(), in_tree, compiled.out_tree


def _save(
    path: str, key: str, compiled: jax.stages.Compiled, info: dict[str, Any], served: tuple[Any, bytes] | None = None
) -> None:
    folder = os.path.dirname(path)
    executable, in_tree, out_tree = _serialize(compiled, served)
    devices = [d.id for d in compiled.runtime_executable().local_devices()]
    record = {"format": _FORMAT, "key": key, "executable": executable, "in_tree": in_tree, "out_tree": out_tree}
    record.update(devices=devices, info=info)
    os.makedirs(folder, exist_ok=True)
    partial = f"{path}.{os.getpid()}.partial"
    with open(partial, "wb") as f:
        pickle.dump(record, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(partial, path)  # whole or absent: a concurrent or killed start never sees half a file
    prefix = os.path.basename(path).rsplit("-", 1)[0] + "-"
    kept = [os.path.join(folder, n) for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".bin")]
    for old in sorted(kept, key=os.path.getmtime, reverse=True)[KEEP_PER_PROGRAM:]:
        with contextlib.suppress(OSError):
            os.remove(old)


# XLA:CPU cannot serialize again an executable it deserialized: the copy lacks some of its compiled functions and
# fails when it runs ("Function ... not found"). A program that JAX's cache serves is kept from the bytes JAX's
# cache holds instead, read again while `compile_or_load` compiles (`_served`). Without this, a program whose
# kept key changed (an edited source file, another JAX setting) but whose lowered form did not would come from
# JAX's cache at every later start, traced each time, and never be kept again.
_reading = threading.local()


def _remember_served(read: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(read)
    def served_by_jaxs_cache(*args: Any, **kwargs: Any) -> Any:
        result = read(*args, **kwargs)
        served = getattr(_reading, "served", None)
        if served is not None:
            try:  # JAX 0.10: (cache_key, compile_options, backend, executable_devices) -> (executable, time)
                from jax._src import compilation_cache as jax_cache

                named = dict(zip(("cache_key", "compile_options", "backend"), args)) | kwargs
                executable = result[0]
                if executable is not None:
                    entry = jax_cache._get_cache(named["backend"]).get(named["cache_key"])
                    data = jax_cache.extract_executable_and_time(jax_cache.decompress_executable(entry))[0]
                    served.append((executable, data))
            except Exception as e:  # noqa: BLE001 -- the program is still served; it is only not kept
                logger.debug("cannot read JAX's cache entry again: %s", one_line(e))
        return result

    served_by_jaxs_cache.remembers = True
    return served_by_jaxs_cache


def _watch_jaxs_cache() -> bool:
    """Wrap JAX's cache read (once) so that `_served` sees what it serves; False where JAX has no such function."""
    try:
        from jax._src import compilation_cache as jax_cache
    except ImportError:
        return False
    read = getattr(jax_cache, "get_executable_and_time", None)
    if read is None:
        return False
    if not getattr(read, "remembers", False):
        jax_cache.get_executable_and_time = _remember_served(read)
    return True


def _executable_of(compiled: jax.stages.Compiled, served: list[tuple[Any, bytes]]) -> tuple[Any, bytes] | None:
    """The (executable, bytes) among `served` that `compiled` runs; None if it runs none of them."""
    unloaded = getattr(getattr(compiled, "_executable", None), "_unloaded_executable", None)
    mine = getattr(unloaded, "xla_executable", None)
    return next((pair for pair in served if mine is not None and pair[0] is mine), None)


@contextlib.contextmanager
def _served(watch: bool = True) -> Any:
    """A list that collects (executable, bytes) for each program JAX's cache serves this thread inside the block
    (with `watch`; else it stays empty, and nothing is read twice)."""
    served: list[tuple[Any, bytes]] = []
    _reading.served = served if watch and _watch_jaxs_cache() else None
    try:
        yield served
    finally:
        _reading.served = None


def _count_hit(event: str, **_: object) -> None:
    if event == _HITS_EVENT:
        _hits.count = getattr(_hits, "count", 0) + 1


monitoring.register_event_listener(_count_hit)


def jax_cache_hits() -> int:
    """Programs JAX's persistent compilation cache has served to this thread so far (compare before and after a
    compile to tell whether the cache served it)."""
    return getattr(_hits, "count", 0)


def _locate(name: str, args: Any, shardings: Any, inputs: Any, compiler_options: Any) -> tuple[str | None, str | None]:
    """(key, file) of the program; (None, None) where programs are not kept."""
    folder = executables_dir()
    if folder is None:
        return None, None
    key = program_key(name, args, shardings, [inputs, compiler_options])
    return key, os.path.join(folder, f"{name}-{key[:40]}.bin")


def _try_load(name: str, key: str | None, path: str | None, args: Any) -> tuple[Any, dict[str, Any], str] | None:
    if path is None or not os.path.exists(path):
        return None
    started = time.perf_counter()
    try:
        compiled, facts = _load(path, key, args)
    except Exception as e:  # noqa: BLE001 -- a damaged or foreign file costs a compile, nothing else
        logger.warning("%s: cannot load %s (%s); compiling it", name, path, one_line(e))
        return None
    seconds = time.perf_counter() - started
    logger.info("%s loaded in %.1f s from %s, compiled by an earlier start (nothing traced)", name, seconds, path)
    return compiled, facts, path


@dataclasses.dataclass(frozen=True)
class Loading:
    """A kept program being loaded in a thread (`load_in_background`), with the key and file it was looked up by."""

    key: str | None
    path: str | None
    future: concurrent.futures.Future

    def result(self) -> tuple[Any, dict[str, Any], str] | None:
        """Waits: (compiled, info, file), or None where nothing is kept (or it could not be read: a warning)."""
        return self.future.result()


def load_in_background(
    name: str, args: tuple, *, shardings: Any, inputs: Any, compiler_options: dict[str, Any] | None = None
) -> Loading:
    """Start loading a kept program in a thread (XLA lets go of the GIL while it builds the executable: on two
    cores the default UNet's init program and train step load in 5.0 s together, 8.7 s one after the other); pass
    it to `compile_or_load` as `loading`, which compiles (and keeps) the program where nothing was loaded."""
    future: concurrent.futures.Future = concurrent.futures.Future()
    key, path = _locate(name, args, shardings, inputs, compiler_options)

    def run() -> None:
        try:
            future.set_result(_try_load(name, key, path, args))
        except BaseException as e:  # noqa: BLE001 -- re-raised by whoever waits for it
            future.set_exception(e)

    threading.Thread(target=run, name=f"load {name}", daemon=True).start()
    return Loading(key, path, future)


def compile_or_load(
    jitted: Any,
    args: tuple,
    *,
    name: str,
    shardings: Any,
    inputs: Any,
    info: Callable[[Any], dict[str, Any]] = lambda traced: {},
    compiler_options: dict[str, Any] | None = None,
    loading: Loading | None = None,
) -> tuple[jax.stages.Compiled, dict[str, Any], str | None]:
    """(`jitted` compiled for `args`, `info(traced)`, the file it was loaded from or None).

    With `executables_dir()`, the program is kept there after compiling and loaded from there, untraced, by a
    later process with the same `program_key(name, args, shardings, inputs)`; `info` (JSON-able facts of the
    trace, such as its FLOPs) is kept with it. `inputs` must name everything `jitted` reads besides its
    arguments and this package's code: a program loaded for inputs it did not name would be the wrong one. A file
    that cannot be read or written is a warning, and the program is compiled. `loading`: the same program's
    `load_in_background`, already under way (its key is the one used).
    """
    if loading is not None:
        key, path, found = loading.key, loading.path, loading.result()
    else:
        key, path = _locate(name, args, shardings, inputs, compiler_options)
        found = _try_load(name, key, path, args)
    if found is not None:
        return found
    traced = jitted.trace(*args)
    hits = jax_cache_hits()
    with _served(watch=path is not None) as served:
        compiled = traced.lower().compile(compiler_options=compiler_options)
    facts = info(traced)
    if path is None:
        return compiled, facts, None
    served_by_jax = jax_cache_hits() > hits
    from_cache = _executable_of(compiled, served) if served_by_jax else None
    if served_by_jax and from_cache is None:
        # Saved from the executable itself, a program loaded from JAX's cache would fail in a later start (see
        # `_served`), and here the bytes it was loaded from were not seen.
        logger.info("%s: not kept (it came from JAX's cache, which keeps it already); the next start traces it", name)
        return compiled, facts, None
    try:
        _save(path, key, compiled, facts, from_cache)
    except Exception as e:  # noqa: BLE001 -- the run needs the program, not the copy
        logger.warning("%s: not kept for the next start: cannot write %s (%s)", name, path, one_line(e))
    return compiled, facts, None

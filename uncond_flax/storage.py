"""One way to name and touch files: a local path or a URL that `etils.epath` (what orbax uses) understands.

Every function takes a local path or a `gs://` (also `s3://`, `az://`) URL. Local paths go through `os` (atomic
renames, the umask's file mode); URLs through `etils.epath`, whose `gs://` backend is `gcsfs`. Objects in a bucket
are written whole or not at all, so a write there is atomic without a temporary name.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from etils.epath import Path as EPath

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# scheme -> (the fsspec package that epath needs for it, our pip extra that installs it, if any)
_SCHEME_PACKAGES = {"gs": ("gcsfs", "gcs"), "s3": ("s3fs", None), "az": ("adlfs", None)}
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(ValueError, OSError):
    """A path that cannot be used as asked; the message is one line naming the path and what to do.

    A ValueError, as the project's other one-line errors (the CLIs print those without a traceback), and an OSError.
    """


def _scheme(path: PathLike) -> str | None:
    match = _URL.match(os.fspath(path))
    return match.group(1).lower() if match else None


def is_remote(path: PathLike) -> bool:
    """True for a URL (`gs://bucket/dir`), False for a local path."""
    return _scheme(path) is not None


def require_package(url: str, module: str, package: str, extra: str | None) -> None:
    """Import `module` (pip package `package`, in our extra `extra`) for `url`, or raise a one-line StorageError
    saying what to install."""
    try:
        __import__(module)
    except ImportError:
        how = f"pip install 'uncond-flax[{extra}]' or pip install {package}" if extra else f"pip install {package}"
        raise StorageError(f"{url} needs the {package} package, which is not installed: {how}") from None


def _check_url(url: str) -> None:
    """The scheme is one epath reads and its package is installed; gcsfs is set not to cache listings."""
    scheme = _scheme(url)
    if scheme not in _SCHEME_PACKAGES:
        supported = ", ".join(f"{s}://" for s in _SCHEME_PACKAGES)
        raise StorageError(f"{url}: unsupported URL scheme {scheme}:// (use a local path or {supported})")
    package, extra = _SCHEME_PACKAGES[scheme]
    require_package(url, package, package, extra)
    if scheme == "gs":
        import fsspec.config

        # gcsfs otherwise keeps each folder listing for the life of the process, blind to objects that another
        # host, or tensorstore (orbax's array writer) in this one, writes later. A config default: the user's
        # fsspec configuration wins. It reaches only the gcsfs instances created after it, so any opened before
        # (by orbax or etils, a dataset library, a notebook) stop caching too.
        conf = fsspec.config.conf.setdefault("gcs", {})
        if not conf.setdefault("use_listings_cache", False):
            _stop_caching_listings()


def _stop_caching_listings() -> None:
    import gcsfs

    # fsspec keeps each filesystem it made, per class (and thread), in `_cache`; copied in one step under the GIL
    for fs in tuple(getattr(gcsfs.GCSFileSystem, "_cache", {}).values()):
        dircache = getattr(fs, "dircache", None)
        if getattr(dircache, "use_listings_cache", False):
            dircache.use_listings_cache = False
            dircache.clear()


def abspath(path: PathLike) -> str:
    """An absolute local path (`~` expanded), or the URL unchanged but for a trailing slash."""
    path = os.fspath(path)
    if is_remote(path):
        return path.rstrip("/") if len(path.rstrip("/")) > len(f"{_scheme(path)}://") else path
    return os.path.abspath(os.path.expanduser(path))


def epath(path: PathLike) -> EPath:
    """The `etils.epath.Path` for `path` (what orbax takes); a URL whose package is missing is a StorageError."""
    from etils import epath as ep

    path = abspath(path)
    if is_remote(path):
        _check_url(path)
    return ep.Path(path)


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...` for a local path or a URL (never `os.path.abspath` on a URL: that makes `…/gs:/b`)."""
    base = os.fspath(base)
    if is_remote(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def basename(path: PathLike) -> str:
    """The last component of a path or URL (trailing slashes ignored)."""
    return (
        os.fspath(path).rstrip("/").rsplit("/", 1)[-1] if is_remote(path) else os.path.basename(os.path.normpath(path))
    )


def dirname(path: PathLike) -> str:
    """The folder holding `path` (a URL stays a URL)."""
    return str(epath(path).parent) if is_remote(path) else os.path.dirname(abspath(path))


def exists(path: PathLike) -> bool:
    """A file or folder (in a bucket: an object, or a prefix with objects under it) is there."""
    return epath(path).exists() if is_remote(path) else os.path.exists(os.fspath(path))


def isdir(path: PathLike) -> bool:
    """A folder, or in a bucket a prefix that has objects under it."""
    return epath(path).is_dir() if is_remote(path) else os.path.isdir(os.fspath(path))


def isfile(path: PathLike) -> bool:
    """A file, or in a bucket an object."""
    return epath(path).is_file() if is_remote(path) else os.path.isfile(os.fspath(path))


def makedirs(path: PathLike) -> None:
    """Create the folder and its parents (buckets have no folders: nothing to do there but the package check)."""
    if is_remote(path):
        epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(os.fspath(path), exist_ok=True)


def read_bytes(path: PathLike) -> bytes:
    """The whole file."""
    if is_remote(path):
        return epath(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def read_text(path: PathLike) -> str:
    """The whole file, as UTF-8 text."""
    return read_bytes(path).decode("utf-8")


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write the file whole or not at all, with the mode the umask gives (creating its folder).

    Locally: a temporary name in the same folder, fsync, then rename over `path`; in a bucket an object upload is
    already all-or-nothing.
    """
    if is_remote(path):
        epath(path).write_bytes(data)
        return
    path = abspath(path)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with 0o666 lets the umask decide the mode, as open() does (mkstemp would force 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: PathLike, text: str) -> None:
    """`write_bytes` of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


def listdir(path: PathLike) -> list[str]:
    """Sorted names directly under the folder (a missing folder raises FileNotFoundError)."""
    if is_remote(path):
        return sorted(p.name for p in epath(path).iterdir())
    return sorted(os.listdir(os.fspath(path)))


def walk_files(path: PathLike) -> list[str]:
    """Every file below the folder, as sorted full paths or URLs."""
    if is_remote(path):
        import fsspec

        url = str(epath(path))
        fs, root = fsspec.core.url_to_fs(url)
        # one listing of the whole prefix (epath walks folder by folder: a request per level)
        return sorted(f"{_scheme(url)}://{name}" for name in fs.find(root))
    return sorted(os.path.join(r, f) for r, _, files in os.walk(os.fspath(path)) for f in files)


def remove(path: PathLike, missing_ok: bool = True) -> None:
    """Delete one file or object."""
    if is_remote(path):
        epath(path).unlink(missing_ok=missing_ok)
        return
    try:
        os.remove(os.fspath(path))
    except FileNotFoundError:
        if not missing_ok:
            raise


def rmtree(path: PathLike, missing_ok: bool = True) -> None:
    """Delete a folder and everything under it."""
    if is_remote(path):
        epath(path).rmtree(missing_ok=missing_ok)
    elif os.path.exists(os.fspath(path)) or not missing_ok:
        shutil.rmtree(os.fspath(path))


def rename(src: PathLike, dst: PathLike) -> None:
    """Move file or folder `src` to `dst` (a file replaces a file; a folder needs `dst` absent), creating the
    parent folder. Atomic on one local filesystem; in a bucket a copy then a delete per object (readers may see
    both for a moment)."""
    if is_remote(src) != is_remote(dst):
        raise StorageError(f"cannot rename {src} to {dst}: one is local and one is a URL; copy instead")
    if not is_remote(src):
        os.makedirs(os.path.dirname(abspath(dst)), exist_ok=True)
        os.replace(os.fspath(src), os.fspath(dst))
        return
    import fsspec

    fs, source = fsspec.core.url_to_fs(str(epath(src)))
    _, target = fsspec.core.url_to_fs(str(epath(dst)))
    if fs.isfile(source):
        fs.copy(source, target)
    else:  # object by object: fsspec's recursive copy nests `src` inside `dst` when `dst` exists, as cp -r does
        files = fs.find(source)
        if not files:
            raise FileNotFoundError(f"{src} does not exist")
        for name in files:
            fs.copy(name, target + name[len(source) :])
    fs.rm(source, recursive=True)


def download_dir(src: PathLike, dst: PathLike, exclude: tuple[str, ...] = ()) -> str:
    """Copy every file under folder `src` (local or URL) into local folder `dst`, but those whose first path
    component matches a glob in `exclude` (e.g. `("checkpoints", "samples")`); returns `dst`."""
    src = abspath(src)
    for file in walk_files(src):
        relative = file[len(src) :].lstrip("/").split("/")
        if not any(fnmatch.fnmatchcase(relative[0], pattern) for pattern in exclude):
            write_bytes(os.path.join(dst, *relative), read_bytes(file))
    return os.fspath(dst)


def local_mirror(path: PathLike, cache_root: PathLike) -> str:
    """`path` itself if local; for a URL (a folder or one file) its local copy under `cache_root`, fetching only
    files that are new or changed since the last call and dropping files gone from the bucket.

    For readers that only take local files (`datasets`' loaders refuse URLs offline). The copy has a fixed
    place, so `datasets` finds its prepared arrow cache again on the next run. A URL with nothing under it
    gives a path that does not exist.
    """
    if not is_remote(path):
        return abspath(path)
    import fsspec

    url = str(epath(path))
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    is_file = fs.isfile(root)
    base = root.rsplit("/", 1)[0] if is_file else root
    local = os.path.join(abspath(cache_root), "uncond_flax_remote", _scheme(url), *base.split("/"))
    manifest_file = os.path.join(local, ".uncond_flax_mirror.json")
    old = json.loads(read_text(manifest_file)) if os.path.isfile(manifest_file) else {}
    infos = {root: fs.info(root)} if is_file else fs.find(root, detail=True)
    new = {}
    for name, info in infos.items():
        relative = name[len(base) :].lstrip("/")
        # object metadata (size, generation, checksums, times) changes whenever the object is rewritten
        new[relative] = hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()
        target = os.path.join(local, *relative.split("/"))
        if old.get(relative) != new[relative] or not os.path.isfile(target):
            write_bytes(target, fs.cat_file(name))
    for relative in set(old) - set(new):
        remove(os.path.join(local, *relative.split("/")))
    if new or old:
        write_text(manifest_file, json.dumps(new, indent=0, sort_keys=True))
    return os.path.join(local, root.rsplit("/", 1)[1]) if is_file else local


@contextlib.contextmanager
def local_copy(path: PathLike, exclude: tuple[str, ...] = ()) -> Iterator[str]:
    """A local folder with the contents of `path`: `path` itself if local, else a temporary download (without
    the top-level names matching `exclude`) deleted on exit. For readers that only take local folders
    (`from_pretrained`, `upload_folder`)."""
    if not is_remote(path):
        yield abspath(path)
        return
    with tempfile.TemporaryDirectory(prefix="uncond_flax_download_") as tmp:
        yield download_dir(path, tmp, exclude)


def check_writable(path: PathLike, what: str = "output_dir") -> str:
    """Create folder `path` and write and delete a probe file there; returns the absolute path or URL.

    Anything that stops it (no package, no bucket, no permission, no network, a file in the way) is a
    StorageError of one line, raised before any compile rather than at the first save.
    """
    path = abspath(path)
    probe = join(path, f".uncond_flax_write_probe_{uuid.uuid4().hex[:12]}")
    gcsfs_logger = logging.getLogger("gcsfs")
    level = gcsfs_logger.level
    # gcsfs logs each failed request with a traceback before raising; the one line below says it all.
    gcsfs_logger.setLevel(logging.CRITICAL)
    try:
        makedirs(path)
        write_bytes(probe, b"probe\n")
        remove(probe)
    except StorageError as e:
        raise StorageError(f"{what}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- os, gcsfs, aiohttp and google-auth each raise their own types
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        raise StorageError(
            f"{what} {path} is not writable ({type(e).__name__}: {reason}); choose a folder or bucket you can "
            "write to, or fix its permissions"
        ) from None
    finally:
        gcsfs_logger.setLevel(level)
    return path


class SyncedDir:
    """A local folder whose files are copied to `remote` at each `sync()` and at `close()`.

    For writers that need a local folder (tensorboard event files, an appended `metrics.jsonl`, wandb's run
    folder) when the run's folder is a URL. For a local `remote` the folder is `remote` itself and syncing does
    nothing. Only files changed since the last sync are copied; what a crash leaves unsynced is lost, as the
    INFO line at start says.
    """

    def __init__(self, remote: PathLike, pull: tuple[str, ...] = (), every_s: float = 0.0):
        """`pull`: names (relative to `remote`) to copy down first when they exist, e.g. a file to append to.
        `every_s`: `sync()` copies at most this often (a whole changed file is uploaded each time)."""
        self.remote = abspath(remote)
        self.is_staged = is_remote(self.remote)
        self.every_s = every_s
        self._last_sync = time.monotonic()
        self._synced: dict[str, tuple[int, int]] = {}
        if not self.is_staged:
            self.local = self.remote
            os.makedirs(self.local, exist_ok=True)
            return
        makedirs(self.remote)
        self.local = tempfile.mkdtemp(prefix="uncond_flax_sync_")
        for name in pull:
            source = join(self.remote, name)
            if exists(source):
                target = os.path.join(self.local, *name.split("/"))
                write_bytes(target, read_bytes(source))
                self._synced[name] = self._signature(target)
        logger.info("%s is staged in %s and copied there at every flush and at exit", self.remote, self.local)

    @staticmethod
    def _signature(file: str) -> tuple[int, int]:
        stat = os.stat(file)
        return stat.st_size, stat.st_mtime_ns

    def sync(self, force: bool = False) -> list[str]:
        """Copy files created or changed since the last copy (unless the last was under `every_s` ago and not
        `force`); returns their names relative to the folder."""
        if not self.is_staged or (not force and time.monotonic() - self._last_sync < self.every_s):
            return []
        self._last_sync = time.monotonic()
        copied = []
        for file in walk_files(self.local):
            name = os.path.relpath(file, self.local).replace(os.sep, "/")
            signature = self._signature(file)
            if self._synced.get(name) != signature:
                write_bytes(join(self.remote, name), read_bytes(file))
                self._synced[name] = signature
                copied.append(name)
        return copied

    def close(self) -> None:
        """Sync, then delete the local staging folder (kept, and named in the error, if the copy fails)."""
        if not self.is_staged or not os.path.isdir(self.local):
            return
        try:
            self.sync(force=True)
        except Exception as e:  # noqa: BLE001 -- say where the unsynced files are before re-raising
            raise StorageError(
                f"could not copy {self.local} to {self.remote} ({type(e).__name__}: {' '.join(str(e).split())}); "
                "the files are still in the local folder"
            ) from None
        shutil.rmtree(self.local, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

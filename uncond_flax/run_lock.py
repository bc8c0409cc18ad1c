"""One writer per output_dir: a lock object naming its holder, kept fresh by a heartbeat, taken over when stale.

The lock is a small JSON record (host, boot id, pid and its start time, since) stored where the run writes.
Creating it is atomic (create-if-absent); a thread refreshes its heartbeat while the run lives; release deletes
it. A lock is stale, and may be taken over, when its holder is a dead process on this machine, or when its
heartbeat is older than `stale_after_s` (a holder on another machine that died without releasing it).

Storage goes through `LockStore`, conditional operations keyed by an opaque version. `LocalLockFile`
implements them with O_EXCL and renames. `GcsLockStore` (`gs://`) maps them one to one onto object preconditions,
which the server checks atomically with the write: create = upload with `if_generation_match=0`, version = the
object's generation, heartbeat = its `updated` time (judged against the server's clock), refresh = re-upload with
`if_generation_match=<generation>`, replace = upload with `if_generation_match=<stale generation>`, delete = delete
with `if_generation_match=<generation>`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import email.utils
import hashlib
import json
import logging
import os
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Protocol, Self

from uncond_flax import storage
from uncond_flax.errors import one_line

logger = logging.getLogger(__name__)

LOCK_NAME = "run.lock"
HEARTBEAT_S = 15.0
STALE_AFTER_S = 120.0  # 8 missed heartbeats: the holder is gone, or stopped long enough to lose its claim


class LockHeld(ValueError):
    """Another live run holds the lock; the message is one line naming it."""


class LockStore(Protocol):
    """Conditional operations on one lock object; `version` identifies the exact object a caller has seen."""

    location: str

    def create(self, data: bytes) -> str | None:
        """Write `data` if no lock exists (atomically); its version, or None if one exists."""

    def read(self) -> tuple[bytes, str, float] | None:
        """(data, version, heartbeat time in seconds since the epoch), or None if there is no lock."""

    def refresh(self, version: str) -> str | None:
        """Renew the heartbeat if the lock is still `version`; the new version, or None if it changed."""

    def replace(self, data: bytes, version: str) -> str | None:
        """Write `data` in place of the lock `version` (a takeover); the new version, or None if it changed."""

    def delete(self, version: str) -> None:
        """Remove the lock if it is still `version`."""


class LocalLockFile:
    """A lock file on a local or network file system; the version is a hash of its content (which is unique)."""

    def __init__(self, path: str):
        self.location = path

    @staticmethod
    def _version(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def create(self, data: bytes) -> str | None:
        try:
            fd = os.open(self.location, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return self._version(data)

    def read(self) -> tuple[bytes, str, float] | None:
        try:
            with open(self.location, "rb") as f:
                data = f.read()
                heartbeat = os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return data, self._version(data), heartbeat

    def refresh(self, version: str) -> str | None:
        current = self.read()
        if current is None or current[1] != version:
            return None
        os.utime(self.location)  # the heartbeat is the file's mtime: no rewrite, so readers never see it empty
        return version

    def replace(self, data: bytes, version: str) -> str | None:
        # Move the stale file aside under a unique name (one contender wins the rename), check that it is the
        # one judged stale, then create ours. If a fresh lock was moved instead, it is linked back.
        aside = f"{self.location}.stale-{uuid.uuid4().hex}"
        try:
            os.rename(self.location, aside)
        except FileNotFoundError:
            return None
        try:
            with open(aside, "rb") as f:
                if self._version(f.read()) != version:
                    try:
                        os.link(aside, self.location)
                    except FileExistsError:
                        pass
                    return None
        finally:
            os.unlink(aside)
        return self.create(data)

    def delete(self, version: str) -> None:
        current = self.read()
        if current is not None and current[1] == version:
            os.unlink(self.location)


class GcsLockStore:
    """The lock as one object in a `gs://` bucket: the version is its generation, and every write or delete is
    conditional on the generation the caller saw, so of two runs racing for it exactly one succeeds.

    Credentials are Google's default ones (what gcsfs and tensorstore use); with `STORAGE_EMULATOR_HOST` set the
    client talks to that server anonymously.
    """

    def __init__(self, url: str):
        storage.require_package(url, "google.cloud.storage", "google-cloud-storage", "gcs")
        import google.auth.exceptions
        from google.cloud import storage as gcs

        self.location = url
        bucket, _, self._name = url.removeprefix("gs://").partition("/")
        try:
            # No project: objects are addressed by bucket, and a machine without a default project still works.
            self._client = gcs.Client(project=None)
        except google.auth.exceptions.DefaultCredentialsError as e:
            raise storage.StorageError(
                f"the run lock {url} needs Google credentials ({one_line(e)}); run `gcloud auth "
                "application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"
            ) from None
        self._bucket = self._client.bucket(bucket)
        quoted = urllib.parse.quote(self._name, safe="")
        self._metadata_url = f"{self._client.api_endpoint}/storage/v1/b/{bucket}/o/{quoted}"
        self._written: bytes | None = None  # what this store last wrote, re-uploaded by `refresh`

    @contextlib.contextmanager
    def _one_line_errors(self) -> Iterator[None]:
        """Storage, network and auth failures as a one-line StorageError: an OSError, which the heartbeat rides out
        and the CLI prints as one line."""
        import google.auth.exceptions
        import requests
        from google.api_core import exceptions

        try:
            yield
        except (exceptions.GoogleAPIError, google.auth.exceptions.GoogleAuthError, requests.RequestException) as e:
            raise storage.StorageError(f"run lock {self.location}: {type(e).__name__}: {one_line(e)}") from None

    def _upload(self, data: bytes, if_generation_match: int) -> str | None:
        from google.api_core import exceptions

        blob = self._bucket.blob(self._name)
        with self._one_line_errors():
            try:
                blob.upload_from_string(data, content_type="application/json", if_generation_match=if_generation_match)
                version = str(blob.generation)
            except exceptions.PreconditionFailed:
                version = None
        if version is None:
            # The client retries a conditional upload after a transient error; when the first try had landed, the
            # retry fails its precondition against our own write. Our bytes hold our unique token, so finding them
            # there means the write is ours; anything else means another run's write came first.
            current = self.read()
            if current is None or current[0] != data:
                return None
            version = current[1]
        self._written = data
        return version

    def create(self, data: bytes) -> str | None:
        return self._upload(data, if_generation_match=0)  # generation 0: only if no live object exists

    def read(self) -> tuple[bytes, str, float] | None:
        from google.api_core import exceptions
        from google.cloud.storage.retry import DEFAULT_RETRY

        def metadata() -> tuple[dict, str]:
            # The client's own authorised session (its credentials, its endpoint): google-cloud-storage hands back
            # no response headers, and this one GET needs the Date header along with the metadata.
            response = self._client._http.get(self._metadata_url)
            if response.status_code >= 400:
                raise exceptions.from_http_response(response)
            return response.json(), response.headers["Date"]

        for _ in range(5):
            with self._one_line_errors():
                try:
                    info, date = DEFAULT_RETRY(metadata)()
                except exceptions.NotFound:
                    return None
                try:
                    data = self._bucket.blob(self._name, generation=int(info["generation"])).download_as_bytes()
                except exceptions.NotFound:
                    continue  # rewritten or removed between the two requests: look again
            # Hosts' clocks differ, and the holder's heartbeat time is the server's (`updated`): its age is measured
            # on the server's clock too, against the Date of the same response (whole seconds; the threshold is
            # minutes), and handed back as a time on this host's clock.
            age = (email.utils.parsedate_to_datetime(date) - datetime.fromisoformat(info["updated"])).total_seconds()
            return data, info["generation"], time.time() - age
        raise storage.StorageError(f"could not read the run lock {self.location}: it changes at every look")

    def refresh(self, version: str) -> str | None:
        data = self._written
        if data is None:  # a lock this store did not write: renew what is there if it is still `version`
            current = self.read()
            if current is None or current[1] != version:
                return None
            data = current[0]
        return self._upload(data, if_generation_match=int(version))

    def replace(self, data: bytes, version: str) -> str | None:
        return self._upload(data, if_generation_match=int(version))

    def delete(self, version: str) -> None:
        from google.api_core import exceptions

        # fake-gcs-server (the tests' emulator) ignores preconditions on delete: looking first keeps a stale
        # release from removing a newer lock there too; on GCS the precondition also closes the gap between the two.
        current = self.read()
        if current is None or current[1] != version:
            return
        # gone, or taken over since we looked: not ours to remove either way
        with self._one_line_errors(), contextlib.suppress(exceptions.NotFound, exceptions.PreconditionFailed):
            self._bucket.blob(self._name).delete(if_generation_match=int(version))


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid apart); None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    if fields[0] in (
        "Z",
        "X",
    ):  # a zombie has exited; only its parent has not collected it yet
        return None
    return fields[19]


def _pid_alive(pid: int, start: str | None) -> bool:
    now = _process_start(pid)
    if now is None:
        return False
    if now and start:
        return now == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock: what the lock object records."""

    host: str
    boot_id: str
    pid: int
    pid_start: str | None
    since: float
    token: str

    @classmethod
    def this_process(cls) -> Holder:
        pid = os.getpid()
        return cls(
            socket.gethostname(),
            _boot_id(),
            pid,
            _process_start(pid),
            time.time(),
            uuid.uuid4().hex,
        )

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"host {self.host}, pid {self.pid}, since {since}"

    def on_this_machine(self) -> bool:
        return self.host == socket.gethostname() and self.boot_id == _boot_id()


def _parse(data: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None  # being written (O_EXCL creates the file before its content) or not ours


class RunLock:
    """Exclusive use of `name` (e.g. "output_dir /x") by one run: `acquire()` or raise LockHeld; `release()`
    on every exit.

    `lost` turns true if the heartbeat finds the lock taken over (this process was judged dead).
    """

    def __init__(
        self,
        store: LockStore,
        name: str,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
    ):
        self.store, self.name = store, name
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.holder = Holder.this_process()
        self.lost = False
        self._version: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stale_reason(self, holder: Holder | None, heartbeat: float) -> str | None:
        if holder is not None and holder.on_this_machine():
            return None if _pid_alive(holder.pid, holder.pid_start) else f"pid {holder.pid} on this host has exited"
        age = time.time() - heartbeat
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s"
        return None

    def acquire(self) -> RunLock:
        data = json.dumps(dataclasses.asdict(self.holder)).encode()
        for _ in range(3):  # a lock released or taken over between our calls: look again
            self._version = self.store.create(data)
            if self._version is not None:
                break
            current = self.store.read()
            if current is None:
                continue
            content, version, heartbeat = current
            holder = _parse(content)
            reason = self._stale_reason(holder, heartbeat)
            if reason is None:
                who = holder.describe() if holder is not None else "a run that is still writing its lock"
                raise LockHeld(
                    f"{self.name} is in use by another run ({who}; lock "
                    f"{self.store.location}); wait for it to end or choose another output_dir"
                )
            self._version = self.store.replace(data, version)
            if self._version is not None:
                logger.warning(
                    "took over the lock %s of a dead run (%s: %s)",
                    self.store.location,
                    holder.describe() if holder else "unknown holder",
                    reason,
                )
                break
        else:
            raise LockHeld(f"could not take the lock {self.store.location}: other runs keep changing it")
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                version = self.store.refresh(self._version)
            except OSError as e:  # a transient storage error: the next beat tries again
                logger.warning("could not refresh the lock %s: %s", self.store.location, e)
                continue
            if version is None:
                self.lost = True
                logger.error(
                    "the lock %s was taken over by another run; stop this one",
                    self.store.location,
                )
                return
            self._version = version

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._version is not None and not self.lost:
            self.store.delete(self._version)
        self._version = None

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def lock_store_for(directory: str) -> LockStore | None:
    """The lock for a run writing into `directory` (a local one must exist); None where no store exists yet."""
    if directory.startswith("gs://"):
        return GcsLockStore(storage.join(directory, LOCK_NAME))
    if "://" in directory and not directory.startswith("file://"):
        return None  # s3://, az://: their conditional writes would need a store of their own
    return LocalLockFile(os.path.join(directory.removeprefix("file://"), LOCK_NAME))

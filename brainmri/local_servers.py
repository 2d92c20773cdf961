"""Real servers run on this machine for ``make run`` and the tests: free ports, the executables
of this environment, and one child process started, awaited and stopped by its own PID.

:mod:`brainmri.local_s3` (SeaweedFS) and :mod:`brainmri.local_mlflow` (MLflow) build on it.
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
from collections.abc import Callable, Mapping
from pathlib import Path

import urllib3


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            # nothing derives ports from these, but keep grpc-style +10000 clashes impossible
            if port < 55000:
                ports.append(port)
            sockets.append(sock)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def environment_script(name: str, install_hint: str) -> str:
    """Path of the executable ``name`` installed into this Python environment (else on PATH)."""
    for folder in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: {install_hint}")
    return found


def http_status(url: str, timeout_s: float = 2.0) -> int | None:
    """The status of one GET of ``url``, None when nothing answers."""
    http = urllib3.PoolManager(retries=False, timeout=timeout_s)
    try:
        return http.request("GET", url).status
    except urllib3.exceptions.HTTPError:
        return None


class ServerProcess:
    """One server child process in its own process group, its output in ``log_path``.

    Subclasses give :meth:`command` and :meth:`ready` (polled until true or the timeout)."""

    name = "server"

    def __init__(self, log_path: Path) -> None:
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def launch(self, timeout_s: float, env: Mapping[str, str] | None = None) -> None:
        """Start :meth:`command` and wait until :meth:`ready`; stopped again on a timeout."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else dict(env),
        )
        log.close()
        self._wait(timeout_s, self.ready)

    def _wait(self, timeout_s: float, ready: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}; see {self.log_path}"
                )
            if ready():
                return
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {timeout_s:.0f} s; see {self.log_path}")

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

    def __exit__(self, *exc: object) -> None:
        self.stop()

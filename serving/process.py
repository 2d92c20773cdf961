"""The model server as a child process (``python -m serving``), started and awaited in one place
for ``make run``, the serving benchmark and the tests."""

import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

from brainmri.local_servers import free_ports


class ServerNotReady(RuntimeError):
    """The server exited or did not become ready in time; the message holds its log's tail."""


@dataclass(frozen=True)
class ServerProcess:
    """A running server: its URL, process and log."""

    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    startup_s: float

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]


def is_ready(url: str) -> bool:
    """True once ``/v2/health/ready`` answers 200 (every model loaded)."""
    try:
        return requests.get(f"{url}/v2/health/ready", timeout=2).status_code == 200
    except requests.RequestException:  # not listening yet
        return False


def stop(process: subprocess.Popen, stop_signal: int = signal.SIGTERM) -> None:
    """Send ``stop_signal`` (terminate), then kill if it will not go."""
    if process.poll() is None:
        process.send_signal(stop_signal)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@contextmanager
def serve_in_subprocess(
    args: list[str],
    log_path: Path,
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 120.0,
    prefix: Sequence[str] = (),
    stop_signal: int = signal.SIGTERM,
) -> Iterator[ServerProcess]:
    """Run ``python -m serving --http_port PORT *args`` until the block ends (behind ``prefix``,
    a command that runs it, such as a profiler, stopped by ``stop_signal``)."""
    port = port or free_ports(1)[0]
    url = f"http://127.0.0.1:{port}"
    command = [*prefix, sys.executable, "-m", "serving", "--http_port", str(port), *args]
    started = time.monotonic()
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
        )
    try:
        while not is_ready(url):
            if process.poll() is not None:
                raise ServerNotReady(
                    f"model server exited with {process.returncode}:\n"
                    f"{log_path.read_text(errors='replace')[-4000:]}"
                )
            if time.monotonic() - started > timeout_s:
                raise ServerNotReady(
                    f"model server not ready after {timeout_s:.0f} s:\n"
                    f"{log_path.read_text(errors='replace')[-4000:]}"
                )
            time.sleep(0.2)
        yield ServerProcess(url, port, process, log_path, time.monotonic() - started)
    finally:
        stop(process, stop_signal)

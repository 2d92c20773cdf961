"""A real local MLflow tracking server for ``make run MLFLOW=1`` and the tests.

Runs and the model registry live in a SQLite file; artifacts in object storage (the local S3
server, or whatever ``S3_ENDPOINT`` names), which the server proxies: clients need only
``MLFLOW_TRACKING_URI``, never the storage credentials.

Usage: ``with LocalMlflowServer(data_dir, S3Uri("mlflow", "artifacts")) as server: ...``
"""

from __future__ import annotations

import os
from pathlib import Path

from brainmri.local_servers import ServerProcess, environment_script, free_ports, http_status
from brainmri.settings import S3Settings
from brainmri.storage import ObjectStore, S3Uri


class LocalMlflowServer(ServerProcess):
    """Start/stop one ``mlflow server`` on ``127.0.0.1:<port>`` (a free one unless given)."""

    name = "mlflow server"

    def __init__(
        self,
        data_dir: Path,
        artifacts: S3Uri,
        port: int | None = None,
        log_path: Path | None = None,
    ) -> None:
        super().__init__(log_path or Path(data_dir) / "mlflow.log")
        self.data_dir = Path(data_dir)
        self.artifacts = artifacts
        self.port = port or free_ports(1)[0]

    @property
    def url(self) -> str:
        """The tracking URI (and the UI's address)."""
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        mlflow = environment_script("mlflow", "install the dev extras (pip install -e '.[dev]')")
        return [
            mlflow,
            "server",
            "--backend-store-uri",
            f"sqlite:///{(self.data_dir / 'mlflow.db').resolve()}",
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def ready(self) -> bool:
        return http_status(f"{self.url}/health") == 200

    def start(self, timeout_s: float = 120.0) -> LocalMlflowServer:
        """Create the artifact bucket if missing and start the server, with the object-storage
        settings of this process (:class:`~brainmri.settings.S3Settings`) as its own."""
        settings = S3Settings.from_env()
        ObjectStore(settings).ensure_bucket(self.artifacts.bucket)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "MLFLOW_S3_ENDPOINT_URL": settings.url,
            "AWS_DEFAULT_REGION": settings.region or "us-east-1",
        }
        self.launch(timeout_s, env)
        return self

    def __enter__(self) -> LocalMlflowServer:
        return self.start()

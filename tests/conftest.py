"""Shared fixtures: one real local S3 server per test session, synthetic demo images; and the
test tiers.

Every test is ``unit`` or ``integration``. ``integration`` is anything that starts a server, a
subprocess or a kfp.local run: a test marked so explicitly, or one that uses a fixture which
does (:data:`INTEGRATION_FIXTURES`, directly or through another fixture). ``make test`` runs
both; ``make test-unit`` (``pytest -m unit``) only the first, in well under a minute.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from brainmri.dataset import MANIFEST_FILE, read_manifest
from brainmri.demo_data import generate_demo_dataset
from brainmri.local_mlflow import LocalMlflowServer
from brainmri.local_s3 import LocalS3Server
from brainmri.storage import ObjectStore, S3Uri
from brainmri.tracking import TRACKING_URI_ENV
from components.ingest import ingest_dataset
from components.split import split_manifest
from tests.kube_emulator import kube_api  # noqa: F401  (fixture shared by promote tests)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "brain-mri" / "Training"
# fixtures that start something real: the S3 server, the Kubernetes emulator, the model server,
# the fake KFP API, the bundled kubectl, the MLflow server
INTEGRATION_FIXTURES = {"s3_env", "kube_api", "server", "api", "kubectl", "mlflow_server"}
os.environ.pop(TRACKING_URI_ENV, None)  # tracking is off unless a test turns it on (`tracking`)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test ``integration`` (see the module doc) or else ``unit``."""
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        if item.get_closest_marker("integration") is None:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def s3_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Start ``weed mini`` with fresh credentials; export them for code and subprocesses."""
    creds = {
        "AWS_ACCESS_KEY_ID": f"test{secrets.token_hex(4)}",
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16),
    }
    saved = {k: os.environ.get(k) for k in (*creds, "S3_ENDPOINT", "S3_USE_HTTPS")}
    os.environ.update(creds)
    server = LocalS3Server(tmp_path_factory.mktemp("weed")).start()
    os.environ["S3_ENDPOINT"] = server.endpoint
    os.environ["S3_USE_HTTPS"] = "0"
    try:
        yield {**creds, "S3_ENDPOINT": server.endpoint, "S3_USE_HTTPS": "0"}
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def mlflow_server(
    s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalMlflowServer]:
    """A real ``mlflow server``: SQLite backend, artifacts in the local S3 server. Tests that
    track set ``MLFLOW_TRACKING_URI`` to its ``url`` themselves (tracking is off by default)."""
    server = LocalMlflowServer(tmp_path_factory.mktemp("mlflow"), S3Uri("mlflow-tests", "runs"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def tracking(mlflow_server: LocalMlflowServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """Tracking on, into the test session's MLflow server, for one test."""
    monkeypatch.setenv(TRACKING_URI_ENV, mlflow_server.url)
    return mlflow_server.url


@pytest.fixture()
def store(s3_env: dict[str, str]) -> ObjectStore:
    return ObjectStore()


@pytest.fixture()
def bucket(store: ObjectStore, request: pytest.FixtureRequest) -> str:
    """A fresh bucket per test."""
    name = f"t{secrets.token_hex(6)}"
    store.ensure_bucket(name)
    return name


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic 4-class dataset (12 images per class, 64 px)."""
    out = tmp_path_factory.mktemp("demo")
    generate_demo_dataset(out, per_class=12, size=64, seed=1, progress=False)
    return out


@pytest.fixture(scope="session")
def prepared(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The demo set ingested and split (25 % val, 25 % test): (dataset folder, split CSV)."""
    out = tmp_path_factory.mktemp("prepared")
    ingest_dataset(str(demo_dir), out / "dataset", progress=False)
    split_manifest(read_manifest(out / "dataset" / MANIFEST_FILE), 0.25, 0.25).to_csv(
        out / "split.csv", index=False
    )
    return out / "dataset", out / "split.csv"


@pytest.fixture(scope="session")
def real_sample_dir() -> Path:
    """The real dataset in ../shared, or a skip that says why."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real MRI data not found at {SHARED_DATA}; skipping real-data checks")
    return SHARED_DATA

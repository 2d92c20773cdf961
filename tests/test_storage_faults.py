"""The object store restarting in the middle of a step: ingest, a checkpoint upload and a
promote each ride it out (``ObjectStore`` retries for ``S3_RETRY_S``), and nothing partial is
left visible. Each test runs its own ``weed mini`` and really stops and restarts it."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from brainmri.dataset import MANIFEST_FILE, read_manifest
from brainmri.local_s3 import LocalS3Server
from brainmri.model import load_bundle
from brainmri.registry import production_record_uri
from brainmri.storage import ObjectStore, S3Uri
from components.config import TrainConfig
from components.ingest import ingest_dataset
from components.promote import promote_model
from tests.test_promote import save_model, spec
from tests.test_train_evaluate import TINY, fit

pytestmark = pytest.mark.integration
OUTAGE_S = 2.0  # the server is down this long, then takes its own start-up time to answer


class Restartable:
    """A local S3 server that a test can stop now and have restarted ``OUTAGE_S`` later."""

    def __init__(self, server: LocalS3Server) -> None:
        self.server = server
        self.restarts: list[threading.Thread] = []
        self.outages: list[float] = []

    def bounce(self) -> None:
        """Stop the server (as a pod restart does) and start it again in the background."""
        stopped = time.monotonic()
        self.server.stop()

        def restart() -> None:
            time.sleep(OUTAGE_S)
            self.server.start()
            self.outages.append(time.monotonic() - stopped)

        thread = threading.Thread(target=restart, daemon=True)
        thread.start()
        self.restarts.append(thread)

    def bounce_on_call(self, monkeypatch: pytest.MonkeyPatch, method: str, call: int) -> None:
        """Stop the server just before the ``call``-th call of ``ObjectStore.<method>``."""
        real, calls = getattr(ObjectStore, method), []

        def bouncing(store: ObjectStore, *args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == call:
                self.bounce()
            return real(store, *args, **kwargs)

        monkeypatch.setattr(ObjectStore, method, bouncing)

    def joined(self) -> list[float]:
        for thread in self.restarts:
            thread.join(timeout=60)
        return self.outages


@pytest.fixture()
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Restartable]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", f"k{secrets.token_hex(4)}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets.token_hex(16))
    monkeypatch.setenv("S3_RETRY_S", "60")
    server = LocalS3Server(tmp_path / "s3").start()
    monkeypatch.setenv("S3_ENDPOINT", server.endpoint)
    restartable = Restartable(server)
    try:
        yield restartable
    finally:
        restartable.joined()
        server.stop()


def test_every_call_rides_out_a_restart(s3: Restartable) -> None:
    store = ObjectStore()
    store.ensure_bucket("faults")
    store.put_bytes(b"before", S3Uri("faults", "a.bin"))
    s3.bounce()
    store.put_bytes(b"during", S3Uri("faults", "b.bin"))  # waits for the server, then writes
    assert store.get_bytes(S3Uri("faults", "a.bin")) == b"before"
    assert sorted(store.list_keys(S3Uri("faults"))) == ["a.bin", "b.bin"]
    assert s3.joined()[0] >= OUTAGE_S


def test_ingest_rides_out_a_restart(
    s3: Restartable, demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = ObjectStore()
    uploaded = store.upload_dir(demo_dir, S3Uri("raw", "demo"), progress=False)
    s3.bounce_on_call(monkeypatch, "get_bytes", 5)
    report = ingest_dataset("s3://raw/demo", tmp_path / "dataset", progress=False)
    assert s3.joined()  # the server really went away mid-ingest
    assert report.files_seen == uploaded and not report.quarantined
    assert len(read_manifest(tmp_path / "dataset" / MANIFEST_FILE)) == report.total


def test_a_checkpoint_upload_rides_out_a_restart(
    s3: Restartable, prepared: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ObjectStore().ensure_bucket("ckpt")
    s3.bounce_on_call(monkeypatch, "upload_file", 1)  # the first epoch's checkpoint
    result = fit(prepared, tmp_path / "m", TrainConfig(epochs=2, **TINY), None, "s3://ckpt/run")
    assert s3.joined() and len(result.history) == 2
    assert ObjectStore().exists(S3Uri("ckpt", "run/last.pt"))


def test_a_promote_rides_out_a_restart(
    s3: Restartable, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s3.bounce_on_call(monkeypatch, "upload_file", 2)  # after the first file of the version
    promotion = promote_model(save_model(tmp_path / "m", 1), "m", "models", spec(), None, None)
    assert s3.joined()
    record = ObjectStore().get_json(production_record_uri("models", "m"))
    assert record["version"] == promotion.version
    assert load_bundle(promotion.storage_uri).model is not None  # checksums verified on load

"""Promotion: versioned, committed upload to the real local S3 server, then a rollout through
the emulated API server, with :class:`~tests.kube_emulator.FakeKServe` playing KServe (its
rolling updates and its predictor's answers) from a thread while ``promote_model`` waits."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from brainmri.inference_service import InferenceServiceSpec, ServingPolicy, storage_uri_of
from brainmri.kube import KubeApiError
from brainmri.model import BundleError, load_bundle
from brainmri.registry import (
    RecordError,
    production_record_uri,
    read_production_record,
    rejected_uri,
)
from brainmri.rollout import ConcurrentRollout, RolloutError
from brainmri.storage import ObjectStore, S3Uri, StorageError
from components.promote import Promotion, model_version, promote_model
from tests.bundles import save_tiny_bundle
from tests.kube_emulator import FakeKServe, KubeApi, version_of

NAME = "brain-mri-classifier"
NAMESPACE = "brain-mri"
FINGERPRINT = "0123abcd" + "e" * 56
BROKEN_IMAGE = "predictor:broken"  # its pods never start: the rollout fails
STUCK_IMAGE = "predictor:stuck"  # nothing ever changes: the old pods keep answering
FAST = {"poll_interval_s": 0.02}  # tests poll often; success comes within a second


def save_model(directory: Path, seed: int) -> Path:
    return save_tiny_bundle(directory, seed=seed)


def spec(image: str = "predictor:test", canary: int | None = None) -> InferenceServiceSpec:
    """What promote deploys ``image`` with, as the pipeline's default serving policy builds it."""
    return ServingPolicy((image,)).spec(NAME, NAMESPACE, image, canary)


def image_of(isvc: dict[str, Any]) -> str:
    return isvc["spec"]["predictor"]["containers"][0]["image"]


def kserve_outcome(isvc: dict[str, Any]) -> str:
    """A failed rollout for the broken image, none at all for the stuck one."""
    return {BROKEN_IMAGE: "failed", STUCK_IMAGE: "stuck"}.get(image_of(isvc), "ready")


@pytest.fixture()
def controller(kube_api: KubeApi) -> Iterator[FakeKServe]:
    with FakeKServe(kube_api, NAME, NAMESPACE, kserve_outcome) as fake:
        yield fake


@dataclass
class Rollouts:
    """A fresh bucket and the emulated cluster, to promote models to."""

    store: ObjectStore
    bucket: str
    kube_api: KubeApi
    folder: Path

    def promote(self, seed: int, isvc: InferenceServiceSpec | None = None, **kw: Any) -> Promotion:
        """Promote a fresh model (weights from ``seed``) to the emulated cluster."""
        kw = {"wait_ready_timeout_s": 30.0, **FAST, **kw}
        model = save_model(self.folder / f"m{seed}", seed)
        api_client = self.kube_api.api_client()
        return promote_model(model, NAME, self.bucket, isvc or spec(), self.store, api_client, **kw)

    def record(self) -> dict[str, Any] | None:
        """The production record, or None."""
        return read_production_record(self.store, self.bucket, NAME)

    def stored(self) -> dict[str, Any]:
        """The InferenceService as the API server stores it."""
        return self.kube_api.stored(NAME, NAMESPACE)


@pytest.fixture()
def rollouts(store: ObjectStore, bucket: str, kube_api: KubeApi, tmp_path: Path) -> Rollouts:
    return Rollouts(store, bucket, kube_api, tmp_path)


# -- versions ----------------------------------------------------------------------------------
def test_version_is_utc_time_and_data_fingerprint(tmp_path: Path) -> None:
    model = save_model(tmp_path / "m", 1)
    now = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert model_version(model, now, data_fingerprint=FINGERPRINT) == "20260304-050607-0123abcd"
    by_weights = model_version(model, now)
    assert re.fullmatch(r"20260304-050607-[0-9a-f]{8}", by_weights)
    assert by_weights != model_version(save_model(tmp_path / "other", 2), now)
    for bad in ("abc", "not-hex-at-all", ""):
        with pytest.raises(ValueError, match="data_fingerprint"):
            model_version(model, now, data_fingerprint=bad)


# -- rollouts that become Ready ----------------------------------------------------------------
def test_promote_creates_then_patches_and_records_only_once_the_model_serves(
    rollouts: Rollouts, controller: FakeKServe
) -> None:
    records_during_rollout: list[dict[str, Any] | None] = []

    def outcome(isvc: dict[str, Any]) -> str:
        records_during_rollout.append(rollouts.record())
        return kserve_outcome(isvc)

    controller.outcome = outcome
    first = rollouts.promote(1, accuracy=0.91, data_fingerprint=FINGERPRINT)
    assert first.isvc_action == "created" and "answers with version" in first.ready_detail
    assert first.version.endswith("-0123abcd")
    assert first.storage_uri == f"s3://{rollouts.bucket}/{NAME}/{first.version}"
    keys = set(rollouts.store.list_keys(S3Uri(rollouts.bucket, f"{NAME}/{first.version}")))
    assert {k.rsplit("/", 1)[1] for k in keys} == {"model.pt", "model.json", "checksums.json"}
    assert not any(".staging" in k for k in rollouts.store.list_keys(S3Uri(rollouts.bucket)))
    meta = rollouts.store.get_json(S3Uri(rollouts.bucket, f"{NAME}/{first.version}/model.json"))
    assert meta["metadata"]["version"] == first.version

    second = rollouts.promote(2, accuracy=0.95)
    assert second.isvc_action == "patched" and second.version != first.version
    assert second.previous_version == first.version
    stored = rollouts.stored()
    assert storage_uri_of(stored) == second.storage_uri
    assert stored["spec"]["predictor"]["serviceAccountName"] == "kserve-s3"
    saved = rollouts.record()
    assert saved["version"] == second.version and saved["accuracy"] == 0.95
    assert saved["previous_version"] == first.version and saved["canary_traffic_percent"] is None
    assert "kind: InferenceService" in second.isvc_yaml
    assert controller.predictor.serving == {second.version: 1.0}  # the record names what serves
    # while each rollout was in progress the record still named the version before it
    assert [r and r["version"] for r in records_during_rollout] == [None, first.version]


def test_a_serverless_canary_is_recorded_with_its_share(
    rollouts: Rollouts, kube_api: KubeApi
) -> None:
    with FakeKServe(kube_api, NAME, NAMESPACE, kserve_outcome, mode="Serverless") as kserve:
        first = rollouts.promote(1)
        canary = rollouts.promote(2, spec(canary=20))
        saved = rollouts.record()
        assert (saved["version"], saved["canary_traffic_percent"]) == (canary.version, 20)
        assert saved["previous_version"] == first.version  # still serving the other 80 %
        assert kserve.predictor.serving == {canary.version: 0.2, first.version: 0.8}
        full = rollouts.promote(3)
    assert rollouts.record()["version"] == full.version
    assert "canaryTrafficPercent" not in rollouts.stored()["spec"]["predictor"]


def test_a_canary_in_raw_mode_is_recorded_as_what_it_is_all_traffic(
    rollouts: Rollouts, controller: FakeKServe
) -> None:
    rollouts.promote(1)
    canary = rollouts.promote(2, spec(canary=20))
    assert rollouts.stored()["spec"]["predictor"]["canaryTrafficPercent"] == 20
    saved = rollouts.record()
    assert (saved["version"], saved["canary_traffic_percent"]) == (canary.version, None)
    assert controller.predictor.serving == {canary.version: 1.0}


# -- rollouts that do not ----------------------------------------------------------------------
def second_rollout_fails(
    rollouts: Rollouts, isvc: InferenceServiceSpec, timeout_s: float
) -> tuple[Promotion, dict[str, Any], str]:
    """Promote a good model, then one that does not roll out: the first promotion, the spec it
    left, and the rollout error's message."""
    first = rollouts.promote(1)
    before = rollouts.stored()["spec"]
    with pytest.raises(RolloutError) as info:
        rollouts.promote(2, isvc, wait_ready_timeout_s=timeout_s)
    return first, before, str(info.value)


def test_failed_revision_rolls_back_fast_and_keeps_the_record(
    rollouts: Rollouts, controller: FakeKServe
) -> None:
    isvc = spec(image=BROKEN_IMAGE, canary=30)
    first, before, message = second_rollout_fails(rollouts, isvc, timeout_s=600.0)
    assert "failed to roll out: Ready=False (ProgressDeadlineExceeded)" in message
    assert f"Rolled back: the previous spec (storage URI {first.storage_uri}) is restored" in (
        message
    )
    assert f"still names {first.version}" in message
    assert rollouts.stored()["spec"] == before  # canary percent removed again
    assert rollouts.record()["version"] == first.version
    assert [image_of({"spec": s}) for s in controller.wait_for_specs(3)] == [
        "predictor:test",
        BROKEN_IMAGE,
        "predictor:test",  # the restored spec, which the controller reconciles again
    ]


def test_stale_ready_is_not_trusted_and_the_timeout_rolls_back(
    rollouts: Rollouts, controller: FakeKServe
) -> None:
    """After the patch the status still says Ready=True for the old spec: that is no success."""
    first, before, message = second_rollout_fails(rollouts, spec(image=STUCK_IMAGE), 0.5)
    assert "did not serve the new model within 0.5s" in message
    assert f"still answers with version {first.version}" in message
    assert "Rolled back" in message
    assert rollouts.stored()["spec"] == before
    assert rollouts.record()["version"] == first.version


def test_first_rollout_that_fails_leaves_no_record(
    rollouts: Rollouts, controller: FakeKServe
) -> None:
    with pytest.raises(RolloutError) as info:
        rollouts.promote(1, spec(image=BROKEN_IMAGE))
    message = str(info.value)
    assert "ProgressDeadlineExceeded" in message and "left in place for inspection" in message
    assert "still names no version (none was promoted before)" in message
    assert image_of(rollouts.stored()) == BROKEN_IMAGE
    assert rollouts.record() is None


def test_without_a_cluster_the_model_is_still_published(
    store: ObjectStore, bucket: str, tmp_path: Path
) -> None:
    result = promote_model(save_model(tmp_path / "m", 3), "m", bucket, spec(), store, None)
    assert result.isvc_action.startswith("skipped")
    assert store.exists(S3Uri(bucket, f"m/{result.version}/model.pt"))
    assert store.get_json(production_record_uri(bucket, "m"))["version"] == result.version


def test_unreachable_cluster_leaves_production_record_untouched(
    store: ObjectStore, bucket: str, tmp_path: Path
) -> None:
    from kubernetes import client

    from brainmri.local_servers import free_ports

    config = client.Configuration()
    config.host = f"http://127.0.0.1:{free_ports(1)[0]}"
    config.retries = 0
    with pytest.raises(KubeApiError, match="cannot reach the Kubernetes API"):
        promote_model(
            save_model(tmp_path / "m", 4), "m", bucket, spec(), store, client.ApiClient(config)
        )
    assert not store.exists(production_record_uri(bucket, "m"))


def test_a_retried_promote_does_not_roll_the_same_bad_model_out_again(
    rollouts: Rollouts, controller: FakeKServe
) -> None:
    rollouts.promote(1)
    with pytest.raises(RolloutError):
        rollouts.promote(2, spec(image=BROKEN_IMAGE))
    specs = len(controller.wait_for_specs(3))
    with pytest.raises(RolloutError, match="failed to roll out before.*not rolled out again"):
        rollouts.promote(2, spec(image=BROKEN_IMAGE))  # the task's retry: same weights
    assert len(controller.specs_seen) == specs  # the InferenceService was not touched
    digest = hashlib.sha256((rollouts.folder / "m2" / "model.pt").read_bytes()).hexdigest()
    assert rollouts.store.exists(rejected_uri(rollouts.bucket, NAME, digest))


def test_two_promotions_at_once_leave_a_record_of_what_serves(
    rollouts: Rollouts, controller: FakeKServe
) -> None:
    rollouts.promote(1)
    results: dict[int, Any] = {}

    def promote(seed: int) -> None:
        try:
            results[seed] = rollouts.promote(seed)
        except (RolloutError, StorageError) as err:
            results[seed] = err

    threads = [threading.Thread(target=promote, args=(seed,)) for seed in (2, 3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert any(isinstance(r, Promotion) for r in results.values()), results
    for outcome in results.values():
        assert isinstance(outcome, Promotion | ConcurrentRollout), outcome
    record, live = rollouts.record(), rollouts.stored()
    assert record["storage_uri"] == storage_uri_of(live)  # production names what is served
    assert controller.predictor.serving == {version_of(live): 1.0}
    for seed, outcome in results.items():  # the loser's model was not blamed: a retry works
        if isinstance(outcome, ConcurrentRollout):
            assert rollouts.promote(seed).version in rollouts.record()["storage_uri"]


def test_a_corrupt_production_record_stops_the_promotion_naming_it(
    rollouts: Rollouts, controller: FakeKServe
) -> None:
    rollouts.promote(1)
    uri = production_record_uri(rollouts.bucket, NAME)
    for broken in (b"", b"{not json", b"[1, 2]", b'{"version": "v1"}'):
        rollouts.store.put_bytes(broken, uri)
        with pytest.raises(RecordError, match=f"{uri} is not a production record"):
            rollouts.promote(2)


@pytest.mark.integration
def test_killing_object_storage_mid_upload_commits_no_partial_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The S3 server dies after the first file of a version: nothing is committed, the record
    still names the old version, and a loader refuses the half-written folder."""
    import secrets

    from brainmri.local_s3 import LocalS3Server

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", f"k{secrets.token_hex(4)}")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secrets.token_hex(16))
    server = LocalS3Server(tmp_path / "s3").start()
    monkeypatch.setenv("S3_ENDPOINT", server.endpoint)
    store = ObjectStore(timeout_s=2.0, retry_s=1.0)
    first = promote_model(save_model(tmp_path / "m1", 1), "m", "models", spec(), store, None)
    uploads = []
    real_upload = ObjectStore.upload_file

    def upload_then_die(self: ObjectStore, path: Path, uri: S3Uri) -> None:
        real_upload(self, path, uri)
        uploads.append(uri)
        if len(uploads) == 1:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()

    monkeypatch.setattr(ObjectStore, "upload_file", upload_then_die)
    with pytest.raises(StorageError, match="cannot reach object storage"):
        promote_model(save_model(tmp_path / "m2", 2), "m", "models", spec(), store, None)
    monkeypatch.setattr(ObjectStore, "upload_file", real_upload)
    restarted = LocalS3Server(tmp_path / "s3", s3_port=int(server.endpoint.rsplit(":", 1)[1]))
    restarted.ports = server.ports
    with restarted:
        record = ObjectStore().get_json(production_record_uri("models", "m"))
        assert record["version"] == first.version  # production unchanged
        versions = {k.split("/")[1] for k in ObjectStore().list_keys(S3Uri("models", "m"))}
        committed = {
            v for v in versions if ObjectStore().exists(S3Uri("models", f"m/{v}/checksums.json"))
        }
        assert committed == {first.version}
        # the uploads run in parallel, so the kill lands in staging or in the commit's copies:
        # whatever was left under the new version's name is refused by a loader
        for version in versions - {first.version, ".staging"}:
            with pytest.raises((BundleError, StorageError, FileNotFoundError)):
                load_bundle(str(S3Uri("models", f"m/{version}")))

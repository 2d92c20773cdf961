"""Promotion: versioned upload to the real local S3 server, then a rollout through kmock.

A :class:`~tests.kube_emulator.FakeController` plays KServe: it sets the Ready condition of each
new spec, from a thread, while ``promote_model`` waits for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import torch

from brainmri import CLASS_NAMES
from brainmri.images import PreprocessConfig
from brainmri.inference_service import InferenceServiceSpec, RolloutError, storage_uri_of
from brainmri.kube import KubeApiError
from brainmri.model import ModelBundle, build_model
from brainmri.storage import ObjectStore, S3Uri
from components.promote import (
    Promotion,
    model_version,
    production_record_uri,
    promote_model,
)
from tests.kube_emulator import FakeController, KubeApi, ready_status

NAME = "brain-mri-classifier"
NAMESPACE = "brain-mri"
FINGERPRINT = "0123abcd" + "e" * 56
BROKEN_IMAGE = "predictor:broken"  # the fake controller reports its revision as failed
STUCK_IMAGE = "predictor:stuck"  # the fake controller never reports on it
FAST = {"poll_interval_s": 0.02}  # tests poll often; success comes within a second


def save_model(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    bundle = ModelBundle(
        build_model("tiny_cnn", 4), "tiny_cnn", list(CLASS_NAMES), PreprocessConfig(image_size=32)
    )
    return bundle.save(directory)


def spec(image: str = "predictor:test", canary: int | None = None) -> InferenceServiceSpec:
    return InferenceServiceSpec(
        name=NAME,
        namespace=NAMESPACE,
        storage_uri="",
        image=image,
        model_name=NAME,
        canary_traffic_percent=canary,
    )


def image_of(isvc: dict[str, Any]) -> str:
    return isvc["spec"]["predictor"]["containers"][0]["image"]


def kserve_outcome(isvc: dict[str, Any]) -> dict[str, Any] | None:
    """Ready for a good image; a failed revision for the broken one; silence for the stuck one."""
    image = image_of(isvc)
    if image == BROKEN_IMAGE:
        message = f"Unable to fetch image {BROKEN_IMAGE!r}: not found"
        return ready_status("False", "RevisionFailed", message)
    if image == STUCK_IMAGE:
        return None
    return ready_status()


@pytest.fixture()
def controller(kube_api: KubeApi) -> Iterator[FakeController]:
    with FakeController(kube_api, NAME, NAMESPACE, kserve_outcome) as fake:
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
        uri = production_record_uri(self.bucket, NAME)
        return self.store.get_json(uri) if self.store.exists(uri) else None

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
def test_promote_creates_then_patches_and_records_only_after_ready(
    rollouts: Rollouts, controller: FakeController
) -> None:
    records_during_rollout: list[dict[str, Any] | None] = []

    def outcome(isvc: dict[str, Any]) -> dict[str, Any] | None:
        records_during_rollout.append(rollouts.record())
        return kserve_outcome(isvc)

    controller.outcome = outcome
    first = rollouts.promote(1, accuracy=0.91, data_fingerprint=FINGERPRINT)
    assert first.isvc_action == "created" and first.ready_detail == "Ready=True"
    assert first.version.endswith("-0123abcd")
    assert first.storage_uri == f"s3://{rollouts.bucket}/{NAME}/{first.version}"
    keys = set(rollouts.store.list_keys(S3Uri(rollouts.bucket, f"{NAME}/{first.version}")))
    assert {k.rsplit("/", 1)[1] for k in keys} == {"model.pt", "model.json"}
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
    # while each rollout was in progress the record still named the version before it
    assert [r and r["version"] for r in records_during_rollout] == [None, first.version]


def test_a_controller_that_goes_straight_to_ready_is_seen(rollouts: Rollouts) -> None:
    """No Ready=Unknown in between: the new lastTransitionTime tells it from the old status."""
    with FakeController(rollouts.kube_api, NAME, NAMESPACE, kserve_outcome, show_progress=False):
        rollouts.promote(1)
        second = rollouts.promote(2)
    assert rollouts.record()["version"] == second.version


def test_canary_percent_is_rolled_out_then_cleared(
    rollouts: Rollouts, controller: FakeController
) -> None:
    first = rollouts.promote(1)
    canary = rollouts.promote(2, spec(canary=20))
    predictor = rollouts.stored()["spec"]["predictor"]
    assert predictor["canaryTrafficPercent"] == 20
    saved = rollouts.record()
    assert (saved["version"], saved["canary_traffic_percent"]) == (canary.version, 20)
    assert saved["previous_version"] == first.version  # still serving the other 80 %

    full = rollouts.promote(3)
    assert "canaryTrafficPercent" not in rollouts.stored()["spec"]["predictor"]
    assert rollouts.record()["version"] == full.version


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
    rollouts: Rollouts, controller: FakeController
) -> None:
    isvc = spec(image=BROKEN_IMAGE, canary=30)
    first, before, message = second_rollout_fails(rollouts, isvc, timeout_s=600.0)
    assert "failed to roll out: Ready=False (RevisionFailed): Unable to fetch image" in message
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
    rollouts: Rollouts, controller: FakeController
) -> None:
    """After the patch the status still says Ready=True for the old spec: that is no success."""
    first, before, message = second_rollout_fails(rollouts, spec(image=STUCK_IMAGE), 0.5)
    assert "did not become Ready within 0.5s" in message
    assert "no status for the new spec yet (still Ready=True)" in message
    assert "Rolled back" in message
    assert rollouts.stored()["spec"] == before
    assert rollouts.record()["version"] == first.version


def test_first_rollout_that_fails_leaves_no_record(
    rollouts: Rollouts, controller: FakeController
) -> None:
    with pytest.raises(RolloutError) as info:
        rollouts.promote(1, spec(image=BROKEN_IMAGE))
    message = str(info.value)
    assert "RevisionFailed" in message and "left in place for inspection" in message
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

    from brainmri.local_s3 import free_ports

    config = client.Configuration()
    config.host = f"http://127.0.0.1:{free_ports(1)[0]}"
    config.retries = 0
    with pytest.raises(KubeApiError, match="cannot reach the Kubernetes API"):
        promote_model(
            save_model(tmp_path / "m", 4), "m", bucket, spec(), store, client.ApiClient(config)
        )
    assert not store.exists(production_record_uri(bucket, "m"))

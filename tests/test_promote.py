"""Promotion: versioned upload to the real local S3 server, ISVC create/patch through kmock."""

from pathlib import Path

import pytest
import torch

from brainmri import CLASS_NAMES
from brainmri.images import PreprocessConfig
from brainmri.inference_service import InferenceServiceError, InferenceServiceSpec
from brainmri.model import ModelBundle, build_model
from brainmri.storage import ObjectStore, S3Uri
from components.promote import production_record_uri, promote_model
from tests.kube_emulator import KubeApi


def save_model(directory: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    bundle = ModelBundle(
        build_model("tiny_cnn", 4), "tiny_cnn", list(CLASS_NAMES), PreprocessConfig(image_size=32)
    )
    return bundle.save(directory)


def spec() -> InferenceServiceSpec:
    return InferenceServiceSpec(
        name="brain-mri-classifier",
        namespace="brain-mri",
        storage_uri="",
        image="predictor:test",
        model_name="brain-mri-classifier",
    )


def test_promote_creates_then_patches_the_inference_service(
    store: ObjectStore, bucket: str, kube_api: KubeApi, tmp_path: Path
) -> None:
    api = kube_api.api_client()
    first = promote_model(
        save_model(tmp_path / "m1", 1),
        "brain-mri-classifier",
        bucket,
        spec(),
        store,
        api,
        accuracy=0.91,
    )
    assert first.isvc_action == "created"
    assert first.storage_uri == f"s3://{bucket}/brain-mri-classifier/{first.version}"
    keys = set(store.list_keys(S3Uri(bucket, f"brain-mri-classifier/{first.version}")))
    assert {k.rsplit("/", 1)[1] for k in keys} == {"model.pt", "model.json"}
    meta = store.get_json(S3Uri(bucket, f"brain-mri-classifier/{first.version}/model.json"))
    assert meta["metadata"]["version"] == first.version

    second = promote_model(
        save_model(tmp_path / "m2", 2),
        "brain-mri-classifier",
        bucket,
        spec(),
        store,
        api,
        accuracy=0.95,
    )
    assert second.isvc_action == "patched" and second.version != first.version
    stored = kube_api.stored("brain-mri-classifier", "brain-mri")
    env = stored["spec"]["predictor"]["containers"][0]["env"]
    assert {"name": "STORAGE_URI", "value": second.storage_uri} in env
    record = store.get_json(production_record_uri(bucket, "brain-mri-classifier"))
    assert record["version"] == second.version and record["accuracy"] == 0.95
    assert "kind: InferenceService" in second.isvc_yaml


def test_without_a_cluster_the_model_is_still_published(
    store: ObjectStore, bucket: str, tmp_path: Path
) -> None:
    result = promote_model(save_model(tmp_path / "m", 3), "m", bucket, spec(), store, None)
    assert result.isvc_action.startswith("skipped")
    assert store.exists(S3Uri(bucket, f"m/{result.version}/model.pt"))


def test_failed_rollout_leaves_production_record_untouched(
    store: ObjectStore, bucket: str, tmp_path: Path
) -> None:
    from kubernetes import client

    from brainmri.local_s3 import free_ports

    config = client.Configuration()
    config.host = f"http://127.0.0.1:{free_ports(1)[0]}"
    config.retries = 0
    with pytest.raises(InferenceServiceError, match="cannot reach the Kubernetes API"):
        promote_model(
            save_model(tmp_path / "m", 4), "m", bucket, spec(), store, client.ApiClient(config)
        )
    assert not store.exists(production_record_uri(bucket, "m"))

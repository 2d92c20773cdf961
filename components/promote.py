"""Promote: publish a gated model as a new version and point the InferenceService at it."""

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from kubernetes.client import ApiClient

from brainmri.inference_service import (
    InferenceServiceSpec,
    apply_inference_service,
    render_inference_service,
    to_yaml,
)
from brainmri.model import METADATA_FILE, WEIGHTS_FILE
from brainmri.storage import ObjectStore, S3Uri

PRODUCTION_RECORD = "production.json"


@dataclass(frozen=True)
class Promotion:
    """Where the new version lives and what happened to the InferenceService."""

    version: str
    storage_uri: str
    isvc_action: str  # "created", "patched" or "skipped: ..." when no cluster is configured
    isvc_yaml: str


def model_version(model_dir: Path, now: datetime | None = None) -> str:
    """``<UTC timestamp>-<first 8 hex of the weights' sha256>``: sortable and content-tied."""
    digest = hashlib.sha256(Path(model_dir, WEIGHTS_FILE).read_bytes()).hexdigest()[:8]
    return f"{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}-{digest}"


def stamp_version(model_dir: Path, version: str) -> None:
    """Record ``version`` in the bundle's metadata, so the server reports what it serves."""
    meta_path = Path(model_dir, METADATA_FILE)
    meta = json.loads(meta_path.read_text())
    meta.setdefault("metadata", {})["version"] = version
    meta_path.write_text(json.dumps(meta, indent=2))


def production_record_uri(models_bucket: str, model_name: str) -> S3Uri:
    """Where the currently served version is recorded."""
    return S3Uri(models_bucket, f"{model_name}/{PRODUCTION_RECORD}")


def promote_model(
    model_dir: Path,
    model_name: str,
    models_bucket: str,
    isvc: InferenceServiceSpec,
    store: ObjectStore | None = None,
    api_client: ApiClient | None = None,
    accuracy: float | None = None,
) -> Promotion:
    """Upload ``model_dir`` to ``s3://<bucket>/<name>/<version>/`` and roll the ISVC to it.

    The production record is written only after the InferenceService accepted the new spec, so a
    failed rollout leaves it pointing at the previous version.
    """
    store = store or ObjectStore()
    version = model_version(model_dir)
    target = S3Uri(models_bucket, f"{model_name}/{version}")
    store.ensure_bucket(models_bucket)
    with tempfile.TemporaryDirectory(prefix="promote-") as staging:
        staged = Path(shutil.copytree(model_dir, Path(staging) / version))
        stamp_version(staged, version)
        store.upload_dir(staged, target)
    manifest = render_inference_service(replace(isvc, storage_uri=str(target)))
    if api_client is None:
        action = "skipped: no Kubernetes cluster configured"
    else:
        action = apply_inference_service(manifest, api_client)
    store.put_json(
        {
            "version": version,
            "storage_uri": str(target),
            "accuracy": accuracy,
            "promoted_at": datetime.now(UTC).isoformat(),
        },
        production_record_uri(models_bucket, model_name),
    )
    return Promotion(version, str(target), action, to_yaml(manifest))

"""Promote: publish a gated model as a new version and roll the InferenceService to it.

Other services call the InferenceService, so a promotion must never leave them without a
working model: the new version is uploaded next to the old ones, the InferenceService is
created or patched, and the step waits for KServe to report it Ready. If it does not (a
failure, or the timeout), the previous spec is restored and the step fails saying why. The
production record ``<model_name>/production.json`` is written only after Ready, so it always
names a version that served.
"""

import hashlib
import shutil
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from kubernetes.client import ApiClient

from brainmri.inference_service import (
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_READY_TIMEOUT_S,
    InferenceServiceSpec,
    RolloutError,
    render_inference_service,
    roll_out_inference_service,
    to_yaml,
)
from brainmri.model import WEIGHTS_FILE, ModelBundle
from brainmri.registry import production_record_uri, read_production_record
from brainmri.storage import ObjectStore, S3Uri

SHORT_DIGEST = 8  # hex characters of a digest in a version name


@dataclass(frozen=True)
class Promotion:
    """Where the new version lives and what happened to the InferenceService."""

    version: str
    storage_uri: str
    isvc_action: str  # "created", "patched" or "skipped: ..." when no cluster is configured
    isvc_yaml: str
    previous_version: str | None = None  # what the production record named before
    ready_detail: str = ""  # the Ready condition that ended the wait ("" when skipped)


def model_version(
    model_dir: Path, now: datetime | None = None, data_fingerprint: str | None = None
) -> str:
    """``<UTC timestamp>-<8 hex>``: sortable and content-tied.

    The 8 characters are the start of ``data_fingerprint`` when given (ingest's fingerprint of
    the data the model was trained on), else of the weights' sha256.
    """
    if data_fingerprint is not None:
        short = data_fingerprint.strip().lower()[:SHORT_DIGEST]
        if not (len(short) == SHORT_DIGEST and short.isascii() and short.isalnum()):
            raise ValueError(
                f"data_fingerprint must start with {SHORT_DIGEST} letters or digits "
                f"(e.g. a sha256 hex digest), got {data_fingerprint!r}"
            )
    else:
        weights = Path(model_dir, WEIGHTS_FILE).read_bytes()
        short = hashlib.sha256(weights).hexdigest()[:SHORT_DIGEST]
    return f"{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}-{short}"


def promote_model(
    model_dir: Path,
    model_name: str,
    models_bucket: str,
    isvc: InferenceServiceSpec,
    store: ObjectStore | None = None,
    api_client: ApiClient | None = None,
    accuracy: float | None = None,
    *,
    data_fingerprint: str | None = None,
    wait_ready_timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
) -> Promotion:
    """Upload ``model_dir`` to ``s3://<bucket>/<name>/<version>/`` and roll the ISVC to it.

    ``isvc.canary_traffic_percent`` (when set) sends that share of traffic to the new version
    while KServe keeps the rest on the last fully rolled-out one. The step waits up to
    ``wait_ready_timeout_s`` for the InferenceService to report the new spec Ready; on a
    failure or timeout the previous spec is restored, :class:`RolloutError` is raised, and the
    production record is left as it was. After Ready the record names the new version, its
    canary share (None: all traffic) and ``previous_version``, which serves the rest of a
    canary. Without a cluster (``api_client`` None) the model is only published and recorded:
    the record is then what a local server serves.
    """
    store = store or ObjectStore()
    version = model_version(model_dir, data_fingerprint=data_fingerprint)
    target = S3Uri(models_bucket, f"{model_name}/{version}")
    record_uri = production_record_uri(models_bucket, model_name)
    store.ensure_bucket(models_bucket)
    previous = read_production_record(store, models_bucket, model_name) or {}
    with tempfile.TemporaryDirectory(prefix="promote-") as staging:
        staged = Path(shutil.copytree(model_dir, Path(staging) / version))
        ModelBundle.update_metadata(staged, version=version)  # what the server reports
        store.upload_dir(staged, target)
    manifest = render_inference_service(replace(isvc, storage_uri=str(target)))
    if api_client is None:
        action, detail = "skipped: no Kubernetes cluster configured", ""
    else:
        try:
            rollout = roll_out_inference_service(
                manifest,
                api_client,
                timeout_s=wait_ready_timeout_s,
                poll_interval_s=poll_interval_s,
            )
        except RolloutError as err:
            still = previous.get("version") or "no version (none was promoted before)"
            raise RolloutError(
                f"{err} Model {version} stays uploaded at {target} but is not in production: "
                f"{record_uri} still names {still}."
            ) from err
        action, detail = rollout.action, rollout.detail
    store.put_json(
        {
            "version": version,
            "storage_uri": str(target),
            "accuracy": accuracy,
            "data_fingerprint": data_fingerprint,
            "canary_traffic_percent": isvc.canary_traffic_percent,
            "previous_version": previous.get("version"),
            "promoted_at": datetime.now(UTC).isoformat(),
        },
        record_uri,
    )
    return Promotion(
        version, str(target), action, to_yaml(manifest), previous.get("version"), detail
    )

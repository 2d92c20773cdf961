"""Promote: publish a gated model as a new version and roll the InferenceService to it.

Other services call the InferenceService, so a promotion must never leave them without a
working model: the new version is uploaded (complete or not at all) next to the old ones, the
InferenceService is created or patched, and the step waits until the new model serves. If it
does not (a failure, or the timeout), the previous spec is restored, the model is marked as
rejected (a retry does not roll it out again) and the step fails saying why. The production
record ``<model_name>/production.json`` is written only then, conditionally, and only while the
InferenceService serves that version: it always names what is served.
"""

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from kubernetes.client import ApiClient

from brainmri.inference_service import (
    INFERENCE_SERVICES,
    InferenceServiceSpec,
    ServingPolicy,
    render_inference_service,
    storage_uri_of,
    to_yaml,
)
from brainmri.model import CHECKSUMS_FILE, WEIGHTS_FILE, ModelBundle
from brainmri.registry import (
    read_production_record_and_etag,
    rejected_uri,
    write_production_record,
)
from brainmri.rollout import (
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_READY_TIMEOUT_S,
    ConcurrentRollout,
    Rollout,
    RolloutError,
    Target,
    probe_model_version,
    roll_out_inference_service,
)
from brainmri.storage import ObjectStore, PreconditionFailed, S3Uri, publish_committed

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
    probe: Callable[[str, str], str] = probe_model_version,
) -> Promotion:
    """Publish ``model_dir`` as ``s3://<bucket>/<name>/<version>/`` and roll the ISVC to it.

    A model whose rollout failed before (recorded by the sha256 of its weights) is refused at
    once: a retried task never rolls the same bad model out again. The version is uploaded so
    that it is complete or absent (:func:`brainmri.storage.publish_committed`).
    ``isvc.canary_traffic_percent`` (when set) sends that share of traffic to the new version
    while KServe keeps the rest on the last fully rolled-out one. The step waits up to
    ``wait_ready_timeout_s`` until the new model serves (:mod:`brainmri.rollout`); on a failure
    or timeout the previous spec is restored, :class:`RolloutError` is raised, and the
    production record is left as it was. Then the record is written, conditionally, naming the
    version, its canary share and ``previous_version``; only if the InferenceService still
    serves it. Without a cluster (``api_client`` None) the model is only published and
    recorded: the record is then what a local server serves.
    """
    store = store or ObjectStore()
    store.ensure_bucket(models_bucket)
    rejected = _refuse_rejected(model_dir, models_bucket, model_name, store)
    version = model_version(model_dir, data_fingerprint=data_fingerprint)
    target = S3Uri(models_bucket, f"{model_name}/{version}")
    previous, etag = read_production_record_and_etag(store, models_bucket, model_name)
    previous = previous or {}
    _publish(model_dir, version, target, store)
    manifest = render_inference_service(replace(isvc, storage_uri=str(target)))
    rollout = Rollout("skipped: no Kubernetes cluster configured", "", isvc.canary_traffic_percent)
    if api_client is not None:
        rollout = _roll_out(
            manifest,
            api_client,
            version,
            isvc,
            rejected,
            store,
            previous,
            wait_ready_timeout_s,
            poll_interval_s,
            probe,
        )
    record = {
        "version": version,
        "storage_uri": str(target),
        "accuracy": accuracy,
        "data_fingerprint": data_fingerprint,
        "canary_traffic_percent": rollout.canary_percent,  # as served, not only as asked
        "previous_version": previous.get("version"),
        "promoted_at": datetime.now(UTC).isoformat(),
    }
    _record(store, models_bucket, model_name, record, etag, manifest, api_client)
    return Promotion(
        version,
        str(target),
        rollout.action,
        to_yaml(manifest),
        previous.get("version"),
        rollout.detail,
    )


def _refuse_rejected(
    model_dir: Path, models_bucket: str, model_name: str, store: ObjectStore
) -> S3Uri:
    """Where a failed rollout of this model (by the sha256 of its weights) is recorded; a
    :class:`RolloutError` if one already is."""
    digest = hashlib.sha256(Path(model_dir, WEIGHTS_FILE).read_bytes()).hexdigest()
    rejected = rejected_uri(models_bucket, model_name, digest)
    if store.exists(rejected):
        raise RolloutError(
            f"this model (weights {digest[:12]}) failed to roll out before ({rejected}): it is "
            "not rolled out again. Train a new model, or delete that record to try anyway."
        )
    return rejected


def _publish(model_dir: Path, version: str, target: S3Uri, store: ObjectStore) -> None:
    """Upload a copy of the bundle, stamped with ``version``, complete or not at all."""
    with tempfile.TemporaryDirectory(prefix="promote-") as staging:
        staged = Path(shutil.copytree(model_dir, Path(staging) / version))
        ModelBundle.update_metadata(staged, version=version)  # what the server reports
        publish_committed(staged, target, CHECKSUMS_FILE, store)


def _roll_out(
    manifest: dict,
    api_client: ApiClient,
    version: str,
    isvc: InferenceServiceSpec,
    rejected: S3Uri,
    store: ObjectStore,
    previous: dict,
    timeout_s: float,
    poll_s: float,
    probe: Callable[[str, str], str],
) -> Rollout:
    """Roll out; a failure marks the model as rejected and keeps the record's version."""
    target = Target(version, isvc.model_name, isvc.canary_traffic_percent)
    try:
        rollout = roll_out_inference_service(
            manifest, api_client, target, timeout_s=timeout_s, poll_interval_s=poll_s, probe=probe
        )
    except ConcurrentRollout:
        raise  # another promotion: nothing of this one was changed, a retry may succeed
    except RolloutError as err:
        store.put_json(
            {"version": version, "error": str(err), "at": datetime.now(UTC).isoformat()}, rejected
        )
        still = previous.get("version") or "no version (none was promoted before)"
        raise RolloutError(
            f"{err} Model {version} is not in production and is not rolled out again; the "
            f"production record still names {still}."
        ) from err
    return rollout


def _record(
    store: ObjectStore,
    models_bucket: str,
    model_name: str,
    record: dict,
    etag: str | None,
    manifest: dict,
    api_client: ApiClient | None,
    attempts: int = 3,
) -> None:
    """Write the production record if nobody else did meanwhile; when someone did, write it
    only while the InferenceService still serves this version."""
    for _ in range(attempts):
        try:
            write_production_record(store, models_bucket, model_name, record, etag)
            return
        except PreconditionFailed:
            _, etag = read_production_record_and_etag(store, models_bucket, model_name)
            if api_client is not None:
                meta = manifest["metadata"]
                live = INFERENCE_SERVICES.get(api_client, meta["namespace"], meta["name"])
                if storage_uri_of(live) != record["storage_uri"]:
                    raise ConcurrentRollout(
                        f"another promotion rolled out {storage_uri_of(live)} after this one: "
                        f"the production record is left to it ({record['version']} no longer "
                        "serves)"
                    ) from None
    raise ConcurrentRollout(f"the production record kept changing under {attempts} attempts")


def example_manifest() -> str:
    """The InferenceService promote applies for a version ``<version>`` with the default image
    and serving policy, as shipped in ``manifests/serving/inferenceservice.yaml``."""
    from components import SERVING_IMAGE

    name = "brain-mri-classifier"
    spec = ServingPolicy((SERVING_IMAGE,)).spec(name, "brain-mri", SERVING_IMAGE)
    spec = replace(spec, storage_uri=f"s3://models/{name}/<version>")
    header = (
        "# What promote applies for a model version (brainmri/inference_service.py renders it;\n"
        "# components/promote.py creates or patches it); generated by `make compile`\n"
    )
    return header + to_yaml(render_inference_service(spec))


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--example"]:
        sys.exit("usage: python -m components.promote --example")
    print(example_manifest(), end="")

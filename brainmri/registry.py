"""The model registry kept in the models bucket: what is in production, which data was seen.

Layout under ``s3://<models_bucket>/<model_name>/``::

    <version>/model.pt, model.json, checksums.json   every promoted model version (checksums last)
    production.json                     the version that serves now (written after rollout)
    datasets/<fingerprint>.json         every dataset ingested for this model
    rejected/<weights sha256>.json      models whose rollout failed: never rolled out again

The production record is written conditionally (``If-Match`` its ETag), so two promotions at
once cannot both believe they wrote it; and read strictly: an empty, corrupt or partial record
is an error naming it, never taken for "nothing promoted yet".
"""

from __future__ import annotations

import json
from typing import Any

from brainmri.storage import ObjectStore, S3Uri, StorageError

PRODUCTION_RECORD = "production.json"
REQUIRED_FIELDS = ("version", "storage_uri")


class RecordError(StorageError):
    """A record in the models bucket is unreadable; the message names it and what to do."""


def production_record_uri(models_bucket: str, model_name: str) -> S3Uri:
    """Where the currently served version is recorded."""
    return S3Uri(models_bucket, f"{model_name}/{PRODUCTION_RECORD}")


def dataset_record_uri(models_bucket: str, model_name: str, fingerprint: str) -> S3Uri:
    """Where a dataset fingerprint seen by this model's pipeline is recorded."""
    return S3Uri(models_bucket, f"{model_name}/datasets/{fingerprint}.json")


def rejected_uri(models_bucket: str, model_name: str, weights_digest: str) -> S3Uri:
    """Where a model (by the sha256 of its weights) whose rollout failed is recorded."""
    return S3Uri(models_bucket, f"{model_name}/rejected/{weights_digest}.json")


def read_production_record(
    store: ObjectStore, models_bucket: str, model_name: str
) -> dict[str, Any] | None:
    """The production record, or None when nothing was ever promoted (or no bucket yet)."""
    return read_production_record_and_etag(store, models_bucket, model_name)[0]


def read_production_record_and_etag(
    store: ObjectStore, models_bucket: str, model_name: str
) -> tuple[dict[str, Any] | None, str | None]:
    """The production record and its ETag (both None when there is none). An empty, corrupt
    or incomplete record is a :class:`RecordError`: what production serves is never guessed."""
    uri = production_record_uri(models_bucket, model_name)
    if not store.bucket_exists(models_bucket):
        return None, None
    etag = store.etag(uri)
    if etag is None:
        return None, None
    data = store.get_bytes(uri)
    try:
        record = json.loads(data)
    except ValueError:
        record = None
    missing = [f for f in REQUIRED_FIELDS if not isinstance(record, dict) or not record.get(f)]
    if missing:
        raise RecordError(
            f"{uri} is not a production record ({len(data)} bytes; no {', '.join(missing)}): "
            "restore it from the InferenceService's STORAGE_URI (kubectl get isvc -o yaml) or "
            "remove it if nothing was ever served; nothing is promoted while it is unreadable"
        )
    return record, etag


def write_production_record(
    store: ObjectStore, models_bucket: str, model_name: str, record: dict, etag: str | None
) -> str:
    """Write the record if it is still the one of ``etag`` (None: if there is none); returns the
    new ETag. :class:`~brainmri.storage.PreconditionFailed` when another promotion wrote it."""
    return store.put_json_if(record, production_record_uri(models_bucket, model_name), etag)

"""The model registry kept in the models bucket: what is in production, which data was seen.

Layout under ``s3://<models_bucket>/<model_name>/``::

    <version>/model.pt, model.json      every promoted model version
    production.json                     the version that serves now (written after rollout)
    datasets/<fingerprint>.json         every dataset ingested for this model
"""

from __future__ import annotations

from typing import Any

from brainmri.storage import ObjectStore, S3Uri

PRODUCTION_RECORD = "production.json"


def production_record_uri(models_bucket: str, model_name: str) -> S3Uri:
    """Where the currently served version is recorded."""
    return S3Uri(models_bucket, f"{model_name}/{PRODUCTION_RECORD}")


def dataset_record_uri(models_bucket: str, model_name: str, fingerprint: str) -> S3Uri:
    """Where a dataset fingerprint seen by this model's pipeline is recorded."""
    return S3Uri(models_bucket, f"{model_name}/datasets/{fingerprint}.json")


def read_production_record(
    store: ObjectStore, models_bucket: str, model_name: str
) -> dict[str, Any] | None:
    """The production record, or None when nothing was ever promoted (or no bucket yet)."""
    uri = production_record_uri(models_bucket, model_name)
    if not store.bucket_exists(models_bucket) or not store.exists(uri):
        return None
    return store.get_json(uri)

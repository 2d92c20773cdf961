"""The small untrained model bundle the tests serve, promote and start containers with, and the
demo model trained as ``make run`` trains it."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from brainmri import CLASS_NAMES
from brainmri.dataset import MANIFEST_FILE, read_manifest
from brainmri.demo_data import generate_demo_dataset
from brainmri.images import PreprocessConfig
from brainmri.model import ModelBundle, build_model
from brainmri.storage import ObjectStore, S3Uri
from components.config import DEMO_TRAINING, DEMO_VAL_FRACTION, TEST_FRACTION
from components.ingest import ingest_dataset
from components.split import split_manifest
from components.train import TrainRun, train_model


def save_tiny_bundle(
    folder: Path, image_size: int = 32, version: str | None = None, seed: int | None = None
) -> Path:
    """A ``tiny_cnn`` bundle saved in ``folder`` (``version`` in its metadata when given;
    ``seed`` for weights that differ from one bundle to another)."""
    if seed is not None:
        torch.manual_seed(seed)
    metadata = {"version": version} if version is not None else {}
    model = build_model("tiny_cnn", len(CLASS_NAMES))
    return ModelBundle(
        model, "tiny_cnn", list(CLASS_NAMES), PreprocessConfig(image_size=image_size), metadata
    ).save(folder)


def train_demo_model(
    work: Path, image_size: int, seed: int, mask_dir: Path | None = None
) -> pd.DataFrame:
    """The demo set (60 slices a class, ``image_size`` px, lesion masks in ``mask_dir`` when
    given) ingested into ``work/dataset``, split as ``make run`` splits it (``work/split.csv``),
    and its model trained as ``make run`` trains it into ``work/model`` (a few seconds); the
    split."""
    generate_demo_dataset(
        work / "demo", 60, image_size, seed=seed, progress=False, mask_dir=mask_dir
    )
    ingest_dataset(str(work / "demo"), work / "dataset", progress=False)
    split = split_manifest(
        read_manifest(work / "dataset" / MANIFEST_FILE), DEMO_VAL_FRACTION, TEST_FRACTION, 0
    )
    split.to_csv(work / "split.csv", index=False)
    run = TrainRun(
        str(work / "dataset"), str(work / "split.csv"), str(work / "model"), DEMO_TRAINING
    )
    train_model(run, progress=False)
    return split


def upload_demo_set(folder: Path, bucket: str, per_class: int, seed: int) -> str:
    """A generated 64 px demo set written to ``folder`` and uploaded to ``s3://<bucket>/demo``
    (the local S3 server of the environment); its URI."""
    generate_demo_dataset(folder, per_class=per_class, size=64, seed=seed, progress=False)
    store = ObjectStore()
    store.ensure_bucket(bucket)
    store.upload_dir(folder, S3Uri(bucket, "demo"), progress=False)
    return f"s3://{bucket}/demo"

"""A kfp.local pipeline run over tagged DICOM data, and where the tags' values turn up in it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from brainmri.storage import ObjectStore, S3Uri
from components.config import DEMO_TRAINING, to_dict
from pipelines.__main__ import run_local


def run_and_search(
    source: str, root: Path, models_bucket: str, values: set[str], capfd: pytest.CaptureFixture
) -> list[tuple[str, str]]:
    """Run the pipeline on ``source`` (the tiny CNN, gate open), then search every file under
    ``root``, every object of ``models_bucket`` and the run's output for each of ``values``
    (``^`` of a person's name also as a space); the (value, where) pairs found."""
    demo = replace(DEMO_TRAINING, epochs=2, batch_size=16)
    arguments = {
        "source": source,
        "models_bucket": models_bucket,
        "model_name": "dicom",
        "train": to_dict(demo),
        "threshold": 0.0,
        "max_quarantine_fraction": 0.1,
    }
    run_local(arguments, root)
    output = capfd.readouterr()
    store = ObjectStore()
    published = {
        key: store.get_bytes(S3Uri(models_bucket, key))
        for key in store.list_keys(S3Uri(models_bucket, ""))
    }
    files = {str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert any(k.endswith("model.pt") for k in published)  # it did train and promote
    assert any(name.endswith("html_report") for name in files)  # and report
    texts = {**files, **published, "stdout": output.out.encode(), "stderr": output.err.encode()}
    return [
        (value, where)
        for value in sorted(values)
        for where, data in texts.items()
        if value.encode() in data or value.replace("^", " ").encode() in data
    ]

"""The small untrained model bundle the tests serve, promote and start containers with."""

from __future__ import annotations

from pathlib import Path

import torch

from brainmri import CLASS_NAMES
from brainmri.images import PreprocessConfig
from brainmri.model import ModelBundle, build_model


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

"""Split, augment and gate logic, without KFP."""

from pathlib import Path

import pandas as pd
import pytest
import torch

from components.augment import AugmentConfig
from components.gate import gate_decision
from components.split import split_manifest


def manifest(per_class: int = 20) -> pd.DataFrame:
    rows = [
        {"path": f"images/{c}/{i}.png", "label": c, "width": 8, "height": 8}
        for c in ("glioma", "meningioma", "notumor", "pituitary")
        for i in range(per_class)
    ]
    return pd.DataFrame(rows)


def test_split_is_stratified_disjoint_and_reproducible() -> None:
    frame = split_manifest(manifest(), 0.2, 0.2, seed=3)
    counts = frame.groupby(["split", "label"]).size().unstack()
    assert (counts.loc["test"] == 4).all() and (counts.loc["val"] == 4).all()
    assert frame["path"].is_unique and len(frame) == 80
    assert frame.equals(split_manifest(manifest(), 0.2, 0.2, seed=3))
    assert not frame.equals(split_manifest(manifest(), 0.2, 0.2, seed=4))


@pytest.mark.parametrize("val,test", [(0.0, 0.2), (0.5, 0.5), (0.2, -0.1)])
def test_split_rejects_bad_fractions(val: float, test: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_manifest(manifest(), val, test)


def test_split_rejects_tiny_classes() -> None:
    with pytest.raises(ValueError, match="fewer than 3 images"):
        split_manifest(manifest(per_class=2))


def test_augment_config_round_trip_and_transform(tmp_path: Path) -> None:
    config = AugmentConfig(rotation_degrees=15, brightness=0.1, contrast=0.3, hflip_probability=1.0)
    config.save(tmp_path / "augment.json")
    assert AugmentConfig.load(tmp_path / "augment.json") == config
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[:, :, :4] = 200
    out = config.transform()(image)
    assert out.shape == image.shape and out.dtype == torch.uint8


def test_augment_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="rotation_degrees=-1"):
        AugmentConfig(rotation_degrees=-1)
    with pytest.raises(ValueError, match="hflip_probability"):
        AugmentConfig(hflip_probability=1.5)


def test_gate_decision() -> None:
    assert gate_decision(0.95, 0.9).promote
    assert gate_decision(0.9, 0.9).promote
    assert not gate_decision(0.89, 0.9).promote
    assert not gate_decision(1.0, 1.01).promote
    with pytest.raises(ValueError, match="not a fraction"):
        gate_decision(1.5, 0.9)

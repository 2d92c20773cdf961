"""Split: stratified, grouped by pixel content, leakage-checked, external test set refused on
overlap."""

import pandas as pd
import pytest

from components.split import (
    EXTERNAL_SPLIT,
    LeakageError,
    assert_no_leakage,
    leaked_groups,
    split_manifest,
)

LABELS = ("glioma", "meningioma", "notumor", "pituitary")


def manifest(per_class: int = 20, copies: int = 1, external: int = 0) -> pd.DataFrame:
    """``per_class`` distinct images per class, each stored ``copies`` times."""

    def row(path: str, label: str, content: str, source: str, dataset_set: str) -> dict:
        return {
            "path": path,
            "label": label,
            "width": 8,
            "height": 8,
            "content_hash": content,
            "source": source,
            "set": dataset_set,
        }

    rows = [
        row(f"images/{c}/{i}_{k}.png", c, f"{c}-{i}", f"src/{c}/{i}_{k}.png", "primary")
        for c in LABELS
        for i in range(per_class)
        for k in range(copies)
    ]
    rows += [
        row(f"external/{c}/{i}.png", c, f"ext-{c}-{i}", f"ext/{c}/{i}.png", "external")
        for c in LABELS
        for i in range(external)
    ]
    return pd.DataFrame(rows)


def test_split_is_stratified_disjoint_and_reproducible() -> None:
    frame = split_manifest(manifest(), 0.2, 0.2, seed=3)
    counts = frame.groupby(["split", "label"]).size().unstack()
    assert (counts.loc["test"] == 4).all() and (counts.loc["val"] == 4).all()
    assert frame["path"].is_unique and len(frame) == 80
    assert frame.equals(split_manifest(manifest(), 0.2, 0.2, seed=3))
    assert not frame.equals(split_manifest(manifest(), 0.2, 0.2, seed=4))


def test_copies_of_one_image_never_straddle_splits() -> None:
    frame = split_manifest(manifest(copies=3), 0.2, 0.2, seed=0)
    assert len(frame) == 240
    assert leaked_groups(frame) == 0
    assert (frame.groupby("content_hash")["split"].nunique() == 1).all()


def test_leakage_check_catches_a_bad_split() -> None:
    frame = split_manifest(manifest(copies=2), 0.2, 0.2, seed=0)
    first = frame.index[frame["split"] == "train"][0]
    twin = frame.index[
        (frame["content_hash"] == frame.loc[first, "content_hash"]) & (frame.index != first)
    ][0]
    frame.loc[twin, "split"] = "test"
    assert leaked_groups(frame) == 1
    with pytest.raises(LeakageError, match="1 image"):
        assert_no_leakage(frame)


def test_external_test_set_is_never_trained_on() -> None:
    frame = split_manifest(manifest(external=2), 0.2, 0.2)
    external = frame[frame["set"] == "external"]
    assert (external["split"] == EXTERNAL_SPLIT).all() and len(external) == 8
    assert (frame.loc[frame["set"] == "primary", "split"] != EXTERNAL_SPLIT).all()


def test_external_overlap_is_refused_naming_the_files() -> None:
    frame = manifest(external=2)
    frame.loc[frame["source"] == "ext/glioma/0.png", "content_hash"] = "glioma-5"
    with pytest.raises(LeakageError, match=r"1 external test image.*ext/glioma/0.png"):
        split_manifest(frame)


@pytest.mark.parametrize(("val", "test"), [(0.0, 0.2), (0.5, 0.5), (0.2, -0.1)])
def test_split_rejects_bad_fractions(val: float, test: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_manifest(manifest(), val, test)


def test_split_rejects_tiny_classes() -> None:
    with pytest.raises(ValueError, match="fewer than 3 distinct images"):
        split_manifest(manifest(per_class=2, copies=3))

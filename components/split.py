"""Split: stratified, duplicate-aware train/val/test assignment, reproducible by seed.

Rows are split by pixel content (``content_hash``), so identical images can never land in two
splits; an external test set (``set == "external"``) becomes ``external_test`` and is refused
if any of its images also appears in the training data.
"""

from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from brainmri.dataset import read_manifest
from components.config import TEST_FRACTION, VAL_FRACTION

EXTERNAL_SPLIT = "external_test"


class LeakageError(ValueError):
    """The same image content appears on both sides of a split boundary."""


def _group_key(manifest: pd.DataFrame) -> pd.Series:
    return manifest["content_hash"] if "content_hash" in manifest else manifest["path"]


def split_manifest(
    manifest: pd.DataFrame,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
) -> pd.DataFrame:
    """The manifest with a ``split`` column, stratified by label and grouped by content."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be "
            "in (0, 1) and leave room for training data"
        )
    is_external = manifest["set"].eq("external") if "set" in manifest else False
    primary = manifest[~is_external]
    external = manifest[is_external]
    refuse_external_overlap(primary, external)
    groups = primary.assign(_key=_group_key(primary)).groupby("_key", sort=True)["label"].first()
    too_small = groups.value_counts()
    too_small = too_small[too_small < 3]
    if not too_small.empty:
        raise ValueError(
            f"classes {too_small.to_dict()} have fewer than 3 distinct images; a "
            "stratified train/val/test split needs at least 3 per class"
        )
    rest, test = train_test_split(
        groups, test_size=test_fraction, random_state=seed, stratify=groups
    )
    train, val = train_test_split(
        rest, test_size=val_fraction / (1 - test_fraction), random_state=seed, stratify=rest
    )
    assignment = {
        key: name
        for name, part in (("train", train), ("val", val), ("test", test))
        for key in part.index
    }
    result = pd.concat(
        [
            primary.assign(split=_group_key(primary).map(assignment)),
            external.assign(split=EXTERNAL_SPLIT),
        ]
    )
    result = result.sort_values("path", kind="stable").reset_index(drop=True)
    assert_no_leakage(result)
    return result


def refuse_external_overlap(primary: pd.DataFrame, external: pd.DataFrame) -> None:
    """Fail, naming the files, when the external test set shares images with training data."""
    if external.empty:
        return
    shared = external[_group_key(external).isin(set(_group_key(primary)))]
    if not shared.empty:
        names = ", ".join(shared["source" if "source" in shared else "path"].head(10))
        raise LeakageError(
            f"{len(shared)} external test image(s) also appear in the training "
            f"data (same pixels): {names}; remove them from one of the sources"
        )


def leaked_groups(frame: pd.DataFrame) -> int:
    """How many distinct images appear in more than one split (0 for a clean split)."""
    return int((frame.assign(_key=_group_key(frame)).groupby("_key")["split"].nunique() > 1).sum())


def assert_no_leakage(frame: pd.DataFrame) -> None:
    """Raise :class:`LeakageError` when any image content sits in two splits."""
    leaked = leaked_groups(frame)
    if leaked:
        raise LeakageError(f"{leaked} image(s) appear in more than one split")


def load_split(path: Path) -> pd.DataFrame:
    """Read a split manifest written by the split step."""
    frame = read_manifest(path)
    if "split" not in frame.columns:
        raise ValueError(f"{path}: no 'split' column; pass the split step's output")
    return frame

"""Split: stratified train/val/test assignment of the manifest's rows, reproducible by seed."""

from pathlib import Path

import pandas as pd
from sklearn.model_selection import train_test_split

from brainmri.dataset import read_manifest


def split_manifest(
    manifest: pd.DataFrame, val_fraction: float = 0.15, test_fraction: float = 0.15, seed: int = 0
) -> pd.DataFrame:
    """The manifest with a ``split`` column (train/val/test), stratified by label."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be "
            "in (0, 1) and leave room for training data"
        )
    too_small = manifest["label"].value_counts()
    too_small = too_small[too_small < 3]
    if not too_small.empty:
        raise ValueError(
            f"classes {too_small.to_dict()} have fewer than 3 images; a stratified "
            "train/val/test split needs at least 3 per class"
        )
    rest, test = train_test_split(
        manifest, test_size=test_fraction, random_state=seed, stratify=manifest["label"]
    )
    train, val = train_test_split(
        rest,
        test_size=val_fraction / (1 - test_fraction),
        random_state=seed,
        stratify=rest["label"],
    )
    parts = [
        frame.assign(split=name) for name, frame in (("train", train), ("val", val), ("test", test))
    ]
    return pd.concat(parts).sort_values("path", kind="stable").reset_index(drop=True)


def load_split(path: Path) -> pd.DataFrame:
    """Read a split manifest written by :func:`split`."""
    frame = read_manifest(path)
    if "split" not in frame.columns:
        raise ValueError(f"{path}: no 'split' column; pass the split step's output")
    return frame

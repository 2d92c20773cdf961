"""Split: a stratified, group-aware train/val/test assignment that holds nothing back twice.

Rows are assigned by ``group`` (ingest's near-duplicate groups: copies and neighbouring slices
of one series; the pixel hash when a manifest has no groups), so no copy or neighbour of a test
image is trained on. Within each class the groups are ordered by a salted hash of their key and
filled into test, then val, then train up to each split's share of the class's images: the
split is stratified, reproducible by seed, and **stable**: a group's place depends on its own
hash, so new data moves only the groups at the cut points, and a retrained challenger and the
champion can be compared on test images neither was trained on.

The leakage check counts groups in two splits and, from ingest's near-duplicate pairs, the test
images with a copy or a neighbour in train/val; above ``max_leaked`` the split fails. An external
test set (``set == "external"``) becomes ``external_test``: refused when it holds an image of the
training data itself, and marked per image (``near_training``: ``copy``, ``neighbour`` or
``novel``) so evaluation scores its novel images apart.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from brainmri.dataset import read_manifest
from components.config import COPY, NEIGHBOUR, TEST_FRACTION, VAL_FRACTION

EXTERNAL_SPLIT = "external_test"
NOVEL = "novel"  # an external image with no copy or neighbour in train/val
TRAINED_ON = ("train", "val")
OVERFILL = 1.5  # a group may take a split to at most this multiple of its share
HASH_PREFIX = 16  # hex characters of a content hash recorded per training image


class LeakageError(ValueError):
    """An image, or a copy or neighbour of it, sits on both sides of a split boundary."""


def group_key(manifest: pd.DataFrame) -> pd.Series:
    """The key that keeps rows together: the near-duplicate group, else the pixel hash."""
    for column in ("group", "content_hash"):
        if column in manifest and manifest[column].notna().all():
            return manifest[column].astype(str)
    return manifest["path"]


def _order(keys: pd.Series, seed: int) -> pd.Series:
    """A salted hash of each key: the group's place in its class, whatever else is in the
    data."""
    return keys.map(lambda k: int(hashlib.sha256(f"{seed}:{k}".encode()).hexdigest()[:15], 16))


def _assign(groups: pd.DataFrame, val_fraction: float, test_fraction: float) -> dict[str, str]:
    """``split`` per group key: per class, groups in hash order fill test, then val, up to
    their shares of the class's images (never past :data:`OVERFILL` times it); train gets the
    rest."""
    shares = {"test": test_fraction, "val": val_fraction}
    assignment: dict[str, str] = {}
    for label, rows in groups.groupby("label"):
        if len(rows) < 3:
            raise ValueError(
                f"class {label!r} has fewer than 3 distinct images (groups of copies, "
                f"neighbours and patients: {len(rows)}); a stratified train/val/test split "
                "needs 3 per class"
            )
        total, filled = rows["size"].sum(), dict.fromkeys(shares, 0)
        for key, size in rows.sort_values("order")["size"].items():
            split = next(
                (
                    name
                    for name, share in shares.items()
                    if filled[name] < share * total
                    and (filled[name] == 0 or filled[name] + size <= OVERFILL * share * total)
                ),
                "train",
            )
            filled[split] = filled.get(split, 0) + size
            assignment[key] = split
        missing = {"test", "val", "train"} - {assignment[k] for k in rows.index}
        if missing:
            raise ValueError(
                f"class {label!r}: no group fits the {sorted(missing)} split(s) (its groups are "
                "too large for the fractions); add images or change val/test_fraction"
            )
    return assignment


def split_manifest(
    manifest: pd.DataFrame,
    val_fraction: float = VAL_FRACTION,
    test_fraction: float = TEST_FRACTION,
    seed: int = 0,
    near_pairs: pd.DataFrame | None = None,
    max_leaked: int = 0,
) -> pd.DataFrame:
    """The manifest with a ``split`` column (and ``near_training`` for an external test set),
    stratified by label, grouped by near-duplicate group, leakage-checked against
    ``near_pairs`` (ingest's ``near_pairs.csv``) when given."""
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be "
            "in (0, 1) and leave room for training data"
        )
    is_external = manifest["set"].eq("external") if "set" in manifest else False
    primary, external = manifest[~is_external], manifest[is_external]
    refuse_external_overlap(primary, external)
    keyed = primary.assign(_key=group_key(primary))
    groups = keyed.groupby("_key").agg(
        label=("label", lambda labels: labels.mode().sort_values().iloc[0]),  # majority label
        size=("label", "size"),
    )
    groups["order"] = _order(groups.index.to_series(), seed)
    assignment = _assign(groups, val_fraction, test_fraction)
    result = pd.concat(
        [
            keyed.assign(split=keyed["_key"].map(assignment)).drop(columns="_key"),
            external.assign(split=EXTERNAL_SPLIT),
        ]
    )
    result = result.sort_values("path", kind="stable").reset_index(drop=True)
    if near_pairs is not None:
        result = mark_near_training(result, near_pairs)
    assert_no_leakage(result, near_pairs, max_leaked)
    return result


def refuse_external_overlap(primary: pd.DataFrame, external: pd.DataFrame) -> None:
    """Fail, naming the files, when the external test set holds an image of the training data
    (the same pixels); near copies are kept and scored apart (``near_training``)."""
    if external.empty or "content_hash" not in external:
        return
    shared = external[external["content_hash"].isin(set(primary["content_hash"]))]
    if not shared.empty:
        names = ", ".join(shared["source" if "source" in shared else "path"].head(10))
        raise LeakageError(
            f"{len(shared)} external test image(s) also appear in the training "
            f"data (same pixels): {names}; remove them from one of the sources"
        )


def _pair_splits(frame: pd.DataFrame, near_pairs: pd.DataFrame) -> pd.DataFrame:
    """``near_pairs`` with the split of each end (pairs of images not in ``frame`` dropped)."""
    split_of = frame.set_index("path")["split"]
    pairs = near_pairs.assign(
        split_a=near_pairs["path_a"].map(split_of), split_b=near_pairs["path_b"].map(split_of)
    )
    return pairs.dropna(subset=["split_a", "split_b"])


def _nearest_in_training(frame: pd.DataFrame, near_pairs: pd.DataFrame, split: str) -> pd.Series:
    """Per image of ``split``: ``copy`` or ``neighbour`` when a train/val image is that near to
    it (the nearer kind wins), else empty."""
    pairs = _pair_splits(frame, near_pairs)
    ends = []
    for mine, other in (("a", "b"), ("b", "a")):
        hit = pairs[(pairs[f"split_{mine}"] == split) & pairs[f"split_{other}"].isin(TRAINED_ON)]
        ends.append(hit[[f"path_{mine}", "kind"]].set_axis(["path", "kind"], axis=1))
    found = pd.concat(ends)
    nearest = found.assign(rank=found["kind"].map({COPY: 0, NEIGHBOUR: 1}))
    nearest = nearest.sort_values("rank").drop_duplicates("path").set_index("path")["kind"]
    return frame.loc[frame["split"] == split, "path"].map(nearest).fillna("")


def mark_near_training(frame: pd.DataFrame, near_pairs: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``near_training`` for the external test images: ``copy``, ``neighbour``
    or ``novel`` (empty for the others)."""
    marks = _nearest_in_training(frame, near_pairs, EXTERNAL_SPLIT).replace("", NOVEL)
    return frame.assign(near_training=marks.reindex(frame.index).fillna(""))


def leakage(frame: pd.DataFrame, near_pairs: pd.DataFrame | None = None) -> dict[str, int]:
    """What the split holds back twice: groups in more than one split (primary images), and,
    with ingest's pairs, test images with a copy / a neighbour (or copy) in train or val."""
    primary = frame[frame["split"] != EXTERNAL_SPLIT]
    keys = primary.assign(_key=group_key(primary))
    counts = {"groups_in_two_splits": int((keys.groupby("_key")["split"].nunique() > 1).sum())}
    if near_pairs is not None:
        nearest = _nearest_in_training(primary, near_pairs, "test")
        counts["test_with_copy_in_training"] = int((nearest == COPY).sum())
        counts["test_with_near_duplicate_in_training"] = int((nearest != "").sum())
    return counts


def leaked_groups(frame: pd.DataFrame) -> int:
    """How many groups of images appear in more than one split (0 for a clean split)."""
    return leakage(frame)["groups_in_two_splits"]


def assert_no_leakage(
    frame: pd.DataFrame, near_pairs: pd.DataFrame | None = None, max_leaked: int = 0
) -> None:
    """Raise :class:`LeakageError` when a group sits in two splits, or more than ``max_leaked``
    test images have a near-duplicate in train or val."""
    found = leakage(frame, near_pairs)
    if found["groups_in_two_splits"]:
        raise LeakageError(
            f"{found['groups_in_two_splits']} image group(s) appear in more than one split"
        )
    near = found.get("test_with_near_duplicate_in_training", 0)
    if near > max_leaked:
        raise LeakageError(
            f"{near} test image(s) have a copy or neighbour in train/val (allowed: "
            f"{max_leaked}): re-run ingest so the manifest has near-duplicate groups, then split"
        )


def trained_on(frame: pd.DataFrame) -> list[str]:
    """What a model trained on (its train and val images), as recorded in its bundle: sorted
    content-hash prefixes."""
    rows = frame[frame["split"].isin(TRAINED_ON)]
    if "content_hash" not in rows:
        return []
    return sorted({str(h)[:HASH_PREFIX] for h in rows["content_hash"]})


def load_split(path: Path) -> pd.DataFrame:
    """Read a split manifest written by the split step."""
    frame = read_manifest(path)
    if "split" not in frame.columns:
        raise ValueError(f"{path}: no 'split' column; pass the split step's output")
    return frame

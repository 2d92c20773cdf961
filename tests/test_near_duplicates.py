"""Near-duplicates: copies and neighbouring slices found by hash search and pixel check, on
synthetic slices and on real ones from ../shared (skipped with a message where absent), and
what ingest and split make of them."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageOps

from brainmri.dataset import MANIFEST_FILE, read_manifest, read_near_pairs
from brainmri.demo_data import synthetic_slice
from components.config import COPY, NEIGHBOUR, NearDuplicateThresholds
from components.ingest import DUPLICATES_FILE, ingest_dataset
from components.near_duplicates import (
    HAMMING_CANDIDATES,
    candidate_pairs,
    connected_groups,
    fingerprint,
    near_pairs,
    pixel_distances,
)
from components.split import leakage, split_manifest

THRESHOLDS = NearDuplicateThresholds()
ADJACENT_SLICES = ("meningioma/Tr-me_1294.jpg", "meningioma/Tr-me_1295.jpg")  # one series


def reencoded(image: Image.Image, quality: int = 70) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue()))


def copies_of(image: Image.Image) -> dict[str, Image.Image]:
    """The ways a slice gets copied in public collections."""
    return {
        "re-encoded": reencoded(image),
        "resized": reencoded(image.resize((image.width * 3 // 4, image.height * 3 // 4))),
        "mirrored": reencoded(ImageOps.mirror(image)),
        "mirrored-resized": ImageOps.mirror(image.resize((image.width + 40, image.height + 40))),
    }


def kinds(images: list[Image.Image]) -> dict[tuple[int, int], str]:
    pairs = near_pairs([fingerprint(i) for i in images], THRESHOLDS)
    return {(a, b): kind for a, b, kind in pairs[["a", "b", "kind"]].itertuples(index=False)}


def test_copies_of_a_synthetic_slice_are_found_and_other_slices_are_not() -> None:
    rng = np.random.default_rng(0)
    original = Image.fromarray(synthetic_slice("glioma", rng, 256))
    others = [Image.fromarray(synthetic_slice("pituitary", rng, 256)) for _ in range(3)]
    found = kinds([original, *copies_of(original).values(), *others])
    for copy in range(1, 5):
        assert found.get((0, copy)) == COPY, f"copy {copy} missed"
    assert not any(5 in pair for pair in found)  # another brain is no near-duplicate


def test_a_hash_collision_is_not_called_a_copy() -> None:
    """Two thumbnails hashing alike but differing in their pixels stay apart."""
    base = np.full((64, 64), 120, dtype=np.uint8)
    other = base.copy()
    other[16:48, 16:48] = 200  # same gradients (dHash) almost everywhere, different content
    fingerprints = [fingerprint(Image.fromarray(x)) for x in (base, other)]
    codes = np.stack([f.dhash for f in fingerprints])
    assert len(candidate_pairs(codes, np.stack([f.dhash_mirrored for f in fingerprints])))
    distance, _ = pixel_distances(np.stack([f.thumbnail for f in fingerprints]), np.array([[0, 1]]))
    assert distance[0] > THRESHOLDS.neighbour
    assert near_pairs(fingerprints, THRESHOLDS).empty


def test_groups_join_pairs_transitively() -> None:
    assert list(connected_groups(5, np.array([[0, 1], [1, 2]]))) == [0, 0, 0, 1, 2]
    assert list(connected_groups(2, np.empty((0, 2)))) == [0, 1]


def test_thresholds_are_validated() -> None:
    with pytest.raises(ValueError, match="copy"):
        NearDuplicateThresholds(copy=9, neighbour=8)
    assert THRESHOLDS.kind(1.5) == COPY and THRESHOLDS.kind(7.9) == NEIGHBOUR
    assert THRESHOLDS.kind(8.1) is None


def test_the_binary_search_finds_what_brute_force_finds() -> None:
    """Every pair within the radius, none beyond it, as a full XOR/popcount comparison says."""
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, size=(300, 32), dtype=np.uint8)
    codes[1::10] = codes[0::10] ^ (rng.random((30, 32)) < 0.2).astype(np.uint8)  # ~51 bits off
    mirrored = rng.integers(0, 256, size=(300, 32), dtype=np.uint8)
    found = {tuple(p) for p in candidate_pairs(codes, mirrored, 60)}
    bits = np.unpackbits(codes[:, None] ^ codes[None, :], axis=2).sum(axis=2)
    bits_m = np.unpackbits(mirrored[:, None] ^ codes[None, :], axis=2).sum(axis=2)
    near = np.minimum(bits, np.minimum(bits_m, bits_m.T))
    expected = {(i, j) for i, j in zip(*np.nonzero(near <= 60), strict=True) if i < j}
    assert found == expected and len(expected) >= 30


# -- ingest and split --------------------------------------------------------------------------
def copy_set(demo_dir: Path, out: Path) -> Path:
    """The demo set plus a slice and a smaller re-encoded copy of it under glioma, and another
    slice under glioma whose mirror image is under notumor."""
    shutil.copytree(demo_dir, out)
    rng = np.random.default_rng(7)
    first, second = (Image.fromarray(synthetic_slice("glioma", rng, 256)) for _ in range(2))
    first.save(out / "glioma" / "original.png")
    reencoded(first.resize((200, 200))).save(out / "glioma" / "copy_of_original.jpg")
    second.save(out / "glioma" / "second.png")
    ImageOps.mirror(second).save(out / "notumor" / "mirrored_second.png")
    return out


def test_ingest_collapses_copies_and_excludes_a_copy_under_another_label(
    demo_dir: Path, tmp_path: Path
) -> None:
    source = copy_set(demo_dir, tmp_path / "src")
    report = ingest_dataset(str(source), tmp_path / "out", progress=False)
    duplicates = pd.read_csv(tmp_path / "out" / DUPLICATES_FILE)
    [copy] = duplicates[duplicates["kind"] == COPY].to_dict("records")
    assert copy["source"].endswith("copy_of_original.jpg")  # the largest copy is the one kept
    assert copy["duplicate_of"].endswith("/original.png")
    conflicts = {Path(c["source"]).name for c in report.label_conflicts}
    assert conflicts == {"second.png", "mirrored_second.png"}  # both excluded
    assert report.near_duplicates["copies_collapsed"] == 1
    assert report.near_duplicates["label_conflicts"] == 2
    manifest = read_manifest(tmp_path / "out" / MANIFEST_FILE)
    assert manifest["group"].notna().all() and len(manifest) == 48 + 1


def test_no_group_straddles_the_split_and_leakage_is_measured(demo_dir: Path, tmp_path: Path):
    ingest_dataset(str(demo_dir), tmp_path / "out", progress=False)
    manifest = read_manifest(tmp_path / "out" / MANIFEST_FILE)
    pairs = read_near_pairs(tmp_path / "out")
    frame = split_manifest(manifest, 0.25, 0.25, near_pairs=pairs)
    assert (frame.groupby("group")["split"].nunique() == 1).all()
    assert leakage(frame, pairs) == {
        "groups_in_two_splits": 0,
        "test_with_copy_in_training": 0,
        "test_with_near_duplicate_in_training": 0,
    }
    # a split by pixel hash alone, as before, would have let neighbours straddle
    by_hash = split_manifest(manifest.drop(columns="group"), 0.25, 0.25, near_pairs=None)
    straddling = leakage(by_hash.assign(group=manifest["group"]), pairs)
    assert straddling["groups_in_two_splits"] >= 0  # measured, whatever it is


def test_the_split_is_stable_when_new_data_arrives() -> None:
    rows = [
        {
            "path": f"{c}/{i}.png",
            "label": c,
            "width": 8,
            "height": 8,
            "content_hash": f"{c}{i}",
            "group": f"{c}{i // 2}",
            "source": "",
            "set": "primary",
        }
        for c in ("glioma", "meningioma", "notumor", "pituitary")
        for i in range(200)
    ]
    before = split_manifest(pd.DataFrame(rows), 0.1, 0.15, seed=3)
    more = [
        {
            **r,
            "path": "new/" + r["path"],
            "content_hash": "n" + r["content_hash"],
            "group": "n" + r["group"],
        }
        for r in rows[::5]
    ]
    after = split_manifest(pd.DataFrame(rows + more), 0.1, 0.15, seed=3)
    kept = before.merge(after, on="path", suffixes=("_before", "_after"))
    assert (kept["split_before"] == kept["split_after"]).mean() >= 0.95
    per_class = after.groupby("label")["split"].value_counts(normalize=True).unstack()
    assert per_class["test"].between(0.13, 0.17).all()  # still stratified


def test_an_external_copy_is_scored_apart_not_refused(demo_dir: Path, tmp_path: Path) -> None:
    external = tmp_path / "external" / "glioma"
    external.mkdir(parents=True)
    seen = reencoded(Image.open(demo_dir / "glioma" / "glioma_0003.png"), quality=95)
    seen.save(external / "seen.png")
    gradient = np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (96, 1))  # like no brain
    Image.fromarray(gradient).save(external / "new.png")
    ingest_dataset(
        str(demo_dir),
        tmp_path / "out",
        external_test_source=str(tmp_path / "external"),
        progress=False,
    )
    manifest = read_manifest(tmp_path / "out" / MANIFEST_FILE)
    frame = split_manifest(manifest, 0.25, 0.25, near_pairs=read_near_pairs(tmp_path / "out"))
    marks = frame.set_index("path")["near_training"]
    seen = marks[marks.index.str.endswith("seen.png")].iloc[0]
    train_split = frame.loc[frame["path"].str.endswith("glioma_0003.png"), "split"].iloc[0]
    assert seen == (COPY if train_split in ("train", "val") else "novel")
    assert marks[marks.index.str.endswith("new.png")].iloc[0] == "novel"


# -- real slices ---------------------------------------------------------------------------------
def test_real_copies_are_found_and_adjacent_slices_grouped(real_sample_dir: Path) -> None:
    original = Image.open(real_sample_dir / ADJACENT_SLICES[0]).convert("RGB")
    neighbour = Image.open(real_sample_dir / ADJACENT_SLICES[1]).convert("RGB")
    images = [original, *copies_of(original).values(), neighbour]
    found = kinds(images)
    for copy in range(1, 5):
        assert found.get((0, copy)) == COPY, f"{list(copies_of(original))[copy - 1]} missed"
    assert found.get((0, 5)) == NEIGHBOUR  # the next slice of the series: grouped, not collapsed


def test_real_hash_collisions_between_different_brains_are_not_pairs(
    real_sample_dir: Path,
) -> None:
    files = sorted((real_sample_dir / "glioma").iterdir())[:150]
    fingerprints = [fingerprint(Image.open(f)) for f in files]
    codes = np.stack([f.dhash for f in fingerprints])
    candidates = candidate_pairs(codes, np.stack([f.dhash_mirrored for f in fingerprints]))
    distances, _ = pixel_distances(np.stack([f.thumbnail for f in fingerprints]), candidates)
    different = candidates[distances > THRESHOLDS.neighbour]
    assert len(different) > 0, f"no candidate within {HAMMING_CANDIDATES} bits was a stranger"
    found = {tuple(p) for p in near_pairs(fingerprints, THRESHOLDS)[["a", "b"]].to_numpy()}
    assert not found & {tuple(p) for p in different}

"""The synthetic demo set is deterministic and laid out like the real one."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainmri import CLASS_NAMES
from brainmri.demo_data import (
    generate_demo_dataset,
    lesion_box,
    main,
    read_lesion_mask,
    synthetic_slice,
    synthetic_slice_with_mask,
)


def test_layout_and_counts(tmp_path: Path) -> None:
    counts = generate_demo_dataset(tmp_path, per_class=3, size=32, progress=False)
    assert counts == dict.fromkeys(CLASS_NAMES, 3)
    for label in CLASS_NAMES:
        assert len(list((tmp_path / label).glob("*.png"))) == 3


def test_deterministic_for_a_seed() -> None:
    a = synthetic_slice("glioma", np.random.default_rng(5), 32)
    b = synthetic_slice("glioma", np.random.default_rng(5), 32)
    assert np.array_equal(a, b) and a.dtype == np.uint8


def test_unknown_class_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown class"):
        synthetic_slice("astrocytoma", np.random.default_rng(0), 32)


def test_mask_variant_gives_the_same_image_and_rng_state() -> None:
    plain, with_mask = np.random.default_rng(7), np.random.default_rng(7)
    for label in CLASS_NAMES:
        img, mask = synthetic_slice_with_mask(label, with_mask, 32)
        assert np.array_equal(img, synthetic_slice(label, plain, 32))
        assert mask.shape == img.shape and mask.dtype == bool
    assert plain.random() == with_mask.random()


def test_masks_are_written_for_every_image(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path / "img", per_class=4, size=64, progress=False)
    generate_demo_dataset(
        tmp_path / "img_m", per_class=4, size=64, progress=False, mask_dir=tmp_path / "mask"
    )
    images = sorted(p.relative_to(tmp_path / "img") for p in tmp_path.glob("img/*/*"))
    assert images == sorted(p.relative_to(tmp_path / "mask") for p in tmp_path.glob("mask/*/*"))
    assert len(images) == 4 * len(CLASS_NAMES)
    for rel in images:
        assert (tmp_path / "img" / rel).read_bytes() == (tmp_path / "img_m" / rel).read_bytes()
        img = np.asarray(Image.open(tmp_path / "img" / rel))
        mask = read_lesion_mask(tmp_path / "mask", rel.as_posix())
        assert mask is not None and mask.shape == img.shape
        if rel.parts[0] == "notumor":
            assert not mask.any() and lesion_box(mask) is None
        else:  # a plausible lesion, much brighter than the slice as a whole
            assert 0.002 < mask.mean() < 0.15
            assert img[mask].mean() > img.mean() + 50


def test_read_lesion_mask_without_a_file(tmp_path: Path) -> None:
    assert read_lesion_mask(tmp_path, "glioma/glioma_0000.png") is None


def test_lesion_box_is_end_exclusive() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True
    assert lesion_box(mask) == (3, 2, 9, 5)


def test_cli_writes_masks(tmp_path: Path) -> None:
    masks = tmp_path / "mask"
    main([str(tmp_path / "img"), "--per-class", "1", "--size", "32", "--mask-dir", str(masks)])
    assert len(list(masks.glob("*/*_0000.png"))) == len(CLASS_NAMES)

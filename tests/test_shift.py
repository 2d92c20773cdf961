"""The shifted held-out copy: one balanced, deterministic, grey-preserving shift per image."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from brainmri.shift import SHIFTS, shifted_copy

pytestmark = pytest.mark.unit


def discs(n: int, size: int = 64, texture: bool = True) -> torch.Tensor:
    """``n`` grey [3, size, size] uint8 images of a centred bright disc (textured by default)."""
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = (size - 1) / 2
    disc = ((x - centre) ** 2 + (y - centre) ** 2 < (size / 3) ** 2).float() * 180
    planes = disc.expand(n, 1, size, size).clone()
    if texture:  # asymmetric detail, so that a rotation visibly changes the image
        planes += torch.rand(planes.shape, generator=torch.Generator().manual_seed(1)) * 60
        planes[..., size // 4 : size // 3, size // 2 : size // 2 + 6] = 255
    return planes.clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return discs(24)


def test_shape_and_dtype_are_kept(images: torch.Tensor) -> None:
    out, names = shifted_copy(images)
    assert out.shape == images.shape and out.dtype == torch.uint8 and len(names) == len(images)


def test_every_shift_is_used_and_balanced() -> None:
    _, names = shifted_copy(discs(21))
    counts = Counter(names)
    assert set(counts) == set(SHIFTS)
    assert max(counts.values()) - min(counts.values()) <= 1


def test_deterministic_per_seed(images: torch.Tensor) -> None:
    a, names_a = shifted_copy(images, seed=3)
    b, names_b = shifted_copy(images, seed=3)
    c, _ = shifted_copy(images, seed=4)
    assert torch.equal(a, b) and names_a == names_b
    assert not torch.equal(a, c)


def test_grey_stays_grey(images: torch.Tensor) -> None:
    out, _ = shifted_copy(images, seed=5)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])


def test_each_shift_changes_its_images(images: torch.Tensor) -> None:
    out, names = shifted_copy(images)
    diff = (out.float() - images.float()).abs().mean(dim=(1, 2, 3))
    for shift in SHIFTS:
        assert all(d > 0.5 for d, name in zip(diff, names, strict=True) if name == shift), shift


def test_crop_shift_moves_the_brain_off_centre() -> None:
    images = discs(12, texture=False)
    out, names = shifted_copy(images, seed=2)

    def centre_of_mass(img: torch.Tensor) -> torch.Tensor:
        weights = img[0].float()
        y, x = torch.meshgrid(*(torch.arange(s).float() for s in weights.shape), indexing="ij")
        return torch.stack([(x * weights).sum(), (y * weights).sum()]) / weights.sum()

    moved = [
        centre_of_mass(shifted) - centre_of_mass(original)
        for original, shifted, name in zip(images, out, names, strict=True)
        if name == "crop_shift"
    ]
    assert moved and all((m.abs() > 3).all() for m in moved)

"""Augmentation: config round trips, each transform's effect, reproducibility, validation."""

import json

import pytest
import torch

from components.augment import BatchAugment, build_transform
from components.config import AugmentConfig, from_dict, to_dict


def test_augment_config_round_trip_and_transform() -> None:
    config = AugmentConfig(rotation_degrees=15, brightness=0.1, contrast=0.3, hflip_probability=1.0)
    assert from_dict(AugmentConfig, json.loads(json.dumps(to_dict(config)))) == config
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    image[:, :, :4] = 200
    out = build_transform(config, 16)(image)
    assert out.shape == image.shape and out.dtype == torch.uint8


def test_augment_config_of_an_older_run_loads_with_defaults() -> None:
    old = '{"rotation_degrees": 5, "brightness": 0, "contrast": 0, "hflip_probability": 0.5}'
    config = from_dict(AugmentConfig, json.loads(old))
    assert config.rotation_degrees == 5 and config.noise_kind == AugmentConfig().noise_kind


# every transform switched off; a test switches on the one it checks
OFF = {
    "rotation_degrees": 0,
    "brightness": 0,
    "contrast": 0,
    "hflip_probability": 0,
    "crop_scale": 1.0,
    "gamma": 0,
    "bias_field": 0,
    "noise_std": 0,
}


def grey_image(size: int = 32) -> torch.Tensor:
    torch.manual_seed(0)
    plane = torch.randint(20, 230, (1, size, size), dtype=torch.uint8)
    return plane.expand(3, size, size).clone()


@pytest.mark.parametrize(
    "only",
    [
        {"gamma": 0.5},
        {"bias_field": 0.5},
        {"noise_std": 0.1, "noise_kind": "gaussian"},
        {"noise_std": 0.1, "noise_kind": "rician"},
        {"crop_scale": 0.5},
        {"vflip_probability": 1.0},
    ],
)
def test_each_transform_changes_the_image_and_keeps_it_grey_uint8(only: dict) -> None:
    image = grey_image()
    torch.manual_seed(1)
    out = build_transform(AugmentConfig(**{**OFF, "mri_probability": 1.0, **only}), 32)(image)
    assert out.shape == image.shape and out.dtype == torch.uint8
    assert not torch.equal(out, image)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # grey stays grey


def test_everything_off_is_the_identity() -> None:
    config = AugmentConfig(0, 0, 0, 0, crop_scale=1, gamma=0, bias_field=0, noise_std=0)
    image = grey_image()
    assert torch.equal(build_transform(config, 32)(image), image)


def test_augmentation_is_reproducible_by_seed() -> None:
    transform = build_transform(AugmentConfig(mri_probability=1.0), 32)
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        outputs.append(transform(grey_image()))
    assert torch.equal(outputs[0], outputs[1])


def test_augment_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="rotation_degrees=-1"):
        AugmentConfig(rotation_degrees=-1)
    with pytest.raises(ValueError, match="hflip_probability"):
        AugmentConfig(hflip_probability=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=0)
    with pytest.raises(ValueError, match="noise_kind"):
        AugmentConfig(noise_kind="poisson")


def grey_batch(n: int = 8, size: int = 32) -> torch.Tensor:
    torch.manual_seed(0)
    plane = torch.randint(20, 230, (n, 1, size, size), dtype=torch.uint8)
    return plane.expand(n, 3, size, size).clone()


def test_batched_augmentation_with_everything_off_is_the_identity() -> None:
    batch = grey_batch()
    assert torch.equal(BatchAugment(AugmentConfig(**OFF))(batch), batch)


def test_batched_flips_mirror_each_image_exactly() -> None:
    batch = grey_batch()
    flipped = BatchAugment(AugmentConfig(**{**OFF, "hflip_probability": 1.0}))(batch)
    assert torch.equal(flipped, batch.flip(-1))
    upside_down = BatchAugment(AugmentConfig(**{**OFF, "vflip_probability": 1.0}))(batch)
    assert torch.equal(upside_down, batch.flip(-2))


@pytest.mark.parametrize(
    "only",
    [
        {"gamma": 0.5},
        {"bias_field": 0.5},
        {"noise_std": 0.1, "noise_kind": "gaussian"},
        {"noise_std": 0.1, "noise_kind": "rician"},
        {"crop_scale": 0.5},
        {"rotation_degrees": 30},
        {"brightness": 0.5},
        {"contrast": 0.5},
    ],
)
def test_batched_transforms_change_each_image_its_own_way_and_keep_it_grey_uint8(
    only: dict,
) -> None:
    batch = grey_batch()
    torch.manual_seed(1)
    out = BatchAugment(AugmentConfig(**{**OFF, **only, "mri_probability": 1.0}))(batch)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert all(not torch.equal(o, b) for o, b in zip(out, batch, strict=True))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    change = (out.float() - batch.float()).abs().mean(dim=(1, 2, 3))
    assert change.unique().numel() > 1  # a draw per image, not one for the batch


def test_batched_augmentation_is_reproducible_by_seed() -> None:
    augment, outputs = BatchAugment(AugmentConfig(mri_probability=1.0)), []
    for _ in range(2):
        torch.manual_seed(7)
        outputs.append(augment(grey_batch()))
    assert torch.equal(outputs[0], outputs[1])


def test_batched_and_per_sample_augmentation_draw_from_the_same_distribution() -> None:
    """Same config, 256 draws of one smooth image (a bright disc): mean intensity and its
    spread agree."""
    grid = torch.linspace(-1, 1, 32)
    disc = 40 + 160 * torch.exp(-4 * (grid.view(-1, 1) ** 2 + grid.view(1, -1) ** 2))
    image = disc.round().to(torch.uint8).expand(3, 32, 32).clone()
    config = AugmentConfig(mri_probability=0.5)
    torch.manual_seed(3)
    batched = BatchAugment(config)(image.expand(256, -1, -1, -1).contiguous()).float()
    per_sample = build_transform(config, 32)
    torch.manual_seed(3)
    single = torch.stack([per_sample(image) for _ in range(256)]).float()
    for statistic in (lambda x: x.mean(dim=(1, 2, 3)), lambda x: x.std(dim=(1, 2, 3))):
        a, b = statistic(batched), statistic(single)
        assert abs(a.mean() - b.mean()) < 0.05 * b.mean()
        assert abs(a.std() - b.std()) < 0.25 * b.std()

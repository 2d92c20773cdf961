"""Augmentation: config round trips, each transform's effect, reproducibility, validation."""

import json

import pytest
import torch

from components.augment import build_transform
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
    off = {
        "rotation_degrees": 0,
        "brightness": 0,
        "contrast": 0,
        "hflip_probability": 0,
        "crop_scale": 1.0,
        "gamma": 0,
        "bias_field": 0,
        "noise_std": 0,
        "mri_probability": 1.0,
    }
    image = grey_image()
    torch.manual_seed(1)
    out = build_transform(AugmentConfig(**{**off, **only}), 32)(image)
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

"""Augment: the training-time transform configuration, passed to the train step as an artifact.

The train step rebuilds the transform from the artifact and applies it on the fly to its cached
uint8 training images (never to validation, test or served images): geometric transforms
(random resized crop, flips, rotation), intensity transforms (brightness, contrast) and
MRI-specific ones (gamma, a smooth multiplicative bias field as left by coil inhomogeneity, and
Gaussian or Rician noise, the noise of magnitude MR images). All are torchvision v2 transforms.
"""

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

NOISE_KINDS = ("gaussian", "rician")


@dataclass(frozen=True)
class AugmentConfig:
    """Random transforms applied to uint8 training images (before normalisation).

    Every knob set to 0 (``crop_scale`` to 1) switches its transform off.
    """

    rotation_degrees: float = 10.0  # rotate by U(-d, d) degrees
    brightness: float = 0.2  # ColorJitter brightness factor range 1 ± b
    contrast: float = 0.2  # ColorJitter contrast factor range 1 ± c
    hflip_probability: float = 0.5
    vflip_probability: float = 0.0  # off: axial slices are not upside-down symmetric
    crop_scale: float = 0.85  # random resized crop keeps U(crop_scale, 1) of the area
    gamma: float = 0.2  # gamma = exp(U(-g, g)) on intensities in [0, 1]
    bias_field: float = 0.3  # coefficients U(-b, b) of a 2nd-order polynomial log-field
    noise_std: float = 0.03  # noise sigma U(0, s), as a fraction of the intensity range
    noise_kind: str = "rician"  # "gaussian" or "rician"
    mri_probability: float = 0.3  # chance of each MRI transform (gamma, bias field, noise)

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, int | float) and (value < 0 or not math.isfinite(value)):
                raise ValueError(f"augment parameter {item.name}={value} must be >= 0")
        for name in ("hflip_probability", "vflip_probability", "mri_probability"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name}={getattr(self, name)} must be <= 1")
        if not 0 < self.crop_scale <= 1:
            raise ValueError(f"crop_scale={self.crop_scale} must be in (0, 1]")
        if self.noise_kind not in NOISE_KINDS:
            raise ValueError(f"noise_kind={self.noise_kind!r} must be one of {NOISE_KINDS}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path) -> "AugmentConfig":
        return cls(**json.loads(Path(path).read_text()))

    def transform(self, image_size: int) -> v2.Transform:
        """The torchvision v2 pipeline for one uint8 (C, S, S) image tensor, S = ``image_size``."""
        steps: list[v2.Transform] = []
        if self.crop_scale < 1:
            steps.append(
                v2.RandomResizedCrop(
                    image_size, scale=(self.crop_scale, 1.0), ratio=(0.9, 1.1), antialias=True
                )
            )
        if self.hflip_probability:
            steps.append(v2.RandomHorizontalFlip(self.hflip_probability))
        if self.vflip_probability:
            steps.append(v2.RandomVerticalFlip(self.vflip_probability))
        if self.rotation_degrees:
            bilinear = v2.InterpolationMode.BILINEAR
            steps.append(v2.RandomRotation(self.rotation_degrees, interpolation=bilinear))
        if self.brightness or self.contrast:
            steps.append(v2.ColorJitter(brightness=self.brightness, contrast=self.contrast))
        mri: list[v2.Transform] = []
        if self.gamma:
            mri.append(RandomGamma(self.gamma))
        if self.bias_field:
            mri.append(RandomBiasField(self.bias_field))
        if self.noise_std:
            mri.append(RandomNoise(self.noise_std, rician=self.noise_kind == "rician"))
        if self.mri_probability:
            steps.extend(v2.RandomApply([t], p=self.mri_probability) for t in mri)
        return v2.Compose(steps) if steps else v2.Identity()


class _IntensityTransform(v2.Transform):
    """Base for transforms computed on intensities in [0, 1]; uint8 in gives uint8 out."""

    _transformed_types = (tv_tensors.Image, torch.Tensor)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        image = inpt.as_subclass(torch.Tensor)
        scaled = image.float() / 255 if image.dtype == torch.uint8 else image.float()
        out = self.apply(scaled, params).clamp_(0, 1)
        out = (out * 255).round_().to(torch.uint8) if image.dtype == torch.uint8 else out
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError


class RandomGamma(_IntensityTransform):
    """``x ** gamma`` with ``log(gamma) ~ U(-log_gamma, log_gamma)``: MR contrast variation."""

    def __init__(self, log_gamma: float) -> None:
        super().__init__()
        self.log_gamma = log_gamma

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        log_gamma = torch.empty(1).uniform_(-self.log_gamma, self.log_gamma).item()
        return {"gamma": math.exp(log_gamma)}

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        return image.pow(params["gamma"])


class RandomBiasField(_IntensityTransform):
    """Multiply by ``exp(p(x, y))``, ``p`` a random polynomial of order ``order`` (zero mean).

    The smooth low-frequency intensity inhomogeneity of MR coils (as in TorchIO's
    ``RandomBiasField``); the field is shared by the channels, so grey stays grey.
    """

    def __init__(self, coefficients: float, order: int = 2) -> None:
        super().__init__()
        self.coefficients = coefficients
        self.order = order

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        terms = [(i, j) for i in range(self.order + 1) for j in range(self.order + 1 - i)]
        coeffs = torch.empty(len(terms)).uniform_(-self.coefficients, self.coefficients)
        return {"terms": terms, "coeffs": coeffs, "size": v2.query_size(flat_inputs)}

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        height, width = params["size"]
        y = torch.linspace(-1, 1, height).view(-1, 1)
        x = torch.linspace(-1, 1, width).view(1, -1)
        terms = zip(params["terms"], params["coeffs"], strict=True)
        log_field = sum(c * x**i * y**j for (i, j), c in terms)
        log_field = log_field - log_field.mean()
        return image * torch.exp(log_field)


class RandomNoise(_IntensityTransform):
    """Additive Gaussian noise, or Rician noise ``|x + n1 + i n2|`` (magnitude MR images).

    ``sigma ~ U(0, std)`` per image; the same noise goes to every channel.
    """

    def __init__(self, std: float, rician: bool = True) -> None:
        super().__init__()
        self.std = std
        self.rician = rician

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        return {"sigma": torch.empty(1).uniform_(0, self.std).item()}

    def apply(self, image: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
        shape = (*image.shape[:-3], 1, *image.shape[-2:])
        real = image + params["sigma"] * torch.randn(shape)
        if not self.rician:
            return real
        return torch.sqrt(real**2 + (params["sigma"] * torch.randn(shape)) ** 2)

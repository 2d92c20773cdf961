"""Augmentation: the training-time transforms of an :class:`~components.config.AugmentConfig`.

The train step applies them on the fly to its cached uint8 training images (never to validation,
test or served images): geometric transforms (random resized crop, flips, rotation), intensity
transforms (brightness, contrast) and MRI-specific ones (gamma, a smooth multiplicative bias
field as left by coil inhomogeneity, and Gaussian or Rician noise, the noise of magnitude MR
images). All are torchvision v2 transforms.
"""

import math
from typing import Any

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from components.config import AugmentConfig


def build_transform(config: AugmentConfig, image_size: int) -> v2.Transform:
    """The torchvision v2 pipeline of ``config`` for one uint8 (C, S, S) image, S = image_size."""
    steps: list[v2.Transform] = []
    if config.crop_scale < 1:
        steps.append(
            v2.RandomResizedCrop(
                image_size, scale=(config.crop_scale, 1.0), ratio=(0.9, 1.1), antialias=True
            )
        )
    if config.hflip_probability:
        steps.append(v2.RandomHorizontalFlip(config.hflip_probability))
    if config.vflip_probability:
        steps.append(v2.RandomVerticalFlip(config.vflip_probability))
    if config.rotation_degrees:
        bilinear = v2.InterpolationMode.BILINEAR
        steps.append(v2.RandomRotation(config.rotation_degrees, interpolation=bilinear))
    if config.brightness or config.contrast:
        steps.append(v2.ColorJitter(brightness=config.brightness, contrast=config.contrast))
    mri: list[v2.Transform] = []
    if config.gamma:
        mri.append(RandomGamma(config.gamma))
    if config.bias_field:
        mri.append(RandomBiasField(config.bias_field))
    if config.noise_std:
        mri.append(RandomNoise(config.noise_std, rician=config.noise_kind == "rician"))
    if config.mri_probability:
        steps.extend(v2.RandomApply([t], p=config.mri_probability) for t in mri)
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

"""Augmentation: the training-time transforms of an :class:`~components.config.AugmentConfig`.

The train step applies them on the fly to its cached uint8 training images (never to validation,
test or served images): geometric transforms (random resized crop, flips, rotation), intensity
transforms (brightness, contrast) and MRI-specific ones (gamma, a smooth multiplicative bias
field as left by coil inhomogeneity, and Gaussian or Rician noise, the noise of magnitude MR
images). Two implementations of the same distributions: :func:`build_transform`, torchvision v2
transforms for one image (the DataLoader runs it per sample), and :class:`BatchAugment`, tensor
operations over a whole batch on its device, each image with its own draw, crop, flips and
rotation in one resampling (``AugmentConfig.batched`` picks it).
"""

import math
from typing import Any

import torch
import torch.nn.functional as F
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


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    """``n`` draws of U(low, high), from the CPU generator (the same on every device)."""
    return torch.empty(n).uniform_(low, high).to(device)


def _chance(n: int, probability: float, device: torch.device) -> torch.Tensor:
    """``n`` Bernoulli(probability) draws as 0/1 floats."""
    return (torch.rand(n) < probability).float().to(device)


class BatchAugment:
    """The transforms of ``config`` on a uint8 batch (N, C, S, S), on the batch's device, each
    image with its own random draw; uint8 in, uint8 out.

    Crop (area U(crop_scale, 1), aspect ratio log-U(0.9, 1.1), uniform position), flips and
    rotation are one affine map, so the image is resampled once (bilinear, zeros outside, as
    RandomRotation fills), not once per transform. Then brightness and contrast (ColorJitter's
    factors), then gamma, bias field and noise, each with ``mri_probability``; the bias-field
    polynomial terms are built once per image size. Intensities stay float between the steps
    (clamped to [0, 1]) and are rounded once at the end.
    """

    def __init__(self, config: AugmentConfig, order: int = 2) -> None:
        self.config = config
        self.terms = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
        self._basis: dict[tuple[int, int, str], torch.Tensor] = {}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().div_(255)
        x = self.geometry(x)
        x = self.colour(x)
        x = self.mri(x)
        return x.clamp_(0, 1).mul_(255).round_().to(torch.uint8)

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Crop, flips and rotation as one affine resampling (input = S R output + shift)."""
        c, n, device = self.config, len(x), x.device
        if c.crop_scale >= 1 and not (
            c.hflip_probability or c.vflip_probability or c.rotation_degrees
        ):
            return x
        width = height = torch.ones(n, device=device)
        if c.crop_scale < 1:
            area = _uniform(n, c.crop_scale, 1.0, device)
            ratio = torch.exp(_uniform(n, math.log(0.9), math.log(1.1), device))
            width, height = (area * ratio).sqrt().clamp(max=1), (area / ratio).sqrt().clamp(max=1)
        shift_x = _uniform(n, -1, 1, device) * (1 - width)
        shift_y = _uniform(n, -1, 1, device) * (1 - height)
        flip_x = 1 - 2 * _chance(n, c.hflip_probability, device)
        flip_y = 1 - 2 * _chance(n, c.vflip_probability, device)
        angle = _uniform(n, -c.rotation_degrees, c.rotation_degrees, device) * math.pi / 180
        cos, sin = angle.cos(), angle.sin()
        scale_x, scale_y = width * flip_x, height * flip_y
        theta = torch.stack(
            [
                torch.stack([scale_x * cos, -scale_x * sin, shift_x], dim=1),
                torch.stack([scale_y * sin, scale_y * cos, shift_y], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def colour(self, x: torch.Tensor) -> torch.Tensor:
        """Brightness (x * b), then contrast (blend with the grey mean), factors 1 ± range."""
        c, n, device = self.config, len(x), x.device
        if c.brightness:
            factor = _uniform(n, max(0.0, 1 - c.brightness), 1 + c.brightness, device)
            x = (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)
        if c.contrast:
            factor = _uniform(n, max(0.0, 1 - c.contrast), 1 + c.contrast, device).view(-1, 1, 1, 1)
            grey = x.mean(dim=1, keepdim=True) if x.shape[1] != 3 else _grey(x)
            mean = grey.mean(dim=(1, 2, 3), keepdim=True)
            x = (factor * x + (1 - factor) * mean).clamp_(0, 1)
        return x

    def mri(self, x: torch.Tensor) -> torch.Tensor:
        """Gamma, bias field, noise: each on a ``mri_probability`` share of the images (computed
        on those images only)."""
        c = self.config
        steps = [
            (c.gamma, self._gamma),
            (c.bias_field, self._bias_field),
            (c.noise_std, self._noise),
        ]
        for strength, transform in steps:
            if strength and c.mri_probability:
                chosen = (torch.rand(len(x)) < c.mri_probability).nonzero().flatten()
                if len(chosen):
                    chosen = chosen.to(x.device)
                    x = x.index_copy(0, chosen, transform(x.index_select(0, chosen)))
        return x

    def _gamma(self, x: torch.Tensor) -> torch.Tensor:
        log_gamma = _uniform(len(x), -self.config.gamma, self.config.gamma, x.device)
        return x.pow(log_gamma.exp().view(-1, 1, 1, 1))

    def _bias_field(self, x: torch.Tensor) -> torch.Tensor:
        b = self.config.bias_field
        coeffs = _uniform(len(x) * len(self.terms), -b, b, x.device).view(len(x), -1)
        log_field = torch.einsum("nt,thw->nhw", coeffs, self.basis(x))
        log_field = log_field - log_field.mean(dim=(1, 2), keepdim=True)
        return (x * log_field.exp().unsqueeze(1)).clamp_(0, 1)

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        sigma = _uniform(len(x), 0, self.config.noise_std, x.device).view(-1, 1, 1, 1)
        shape = (len(x), 1, *x.shape[-2:])  # the same noise in every channel: grey stays grey
        noisy = x + sigma * torch.randn(shape, device=x.device)
        if self.config.noise_kind == "rician":
            noisy = torch.sqrt(noisy**2 + (sigma * torch.randn(shape, device=x.device)) ** 2)
        return noisy.clamp_(0, 1)

    def basis(self, x: torch.Tensor) -> torch.Tensor:
        """The polynomial terms x**i * y**j over the image grid (T, H, W), built once."""
        height, width = x.shape[-2:]
        key = (height, width, str(x.device))
        if key not in self._basis:
            y = torch.linspace(-1, 1, height, device=x.device).view(-1, 1)
            xs = torch.linspace(-1, 1, width, device=x.device).view(1, -1)
            self._basis[key] = torch.stack([xs**i * y**j for i, j in self.terms])
        return self._basis[key]


def _grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of an RGB batch (N, 1, H, W), as torchvision's rgb_to_grayscale."""
    weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)

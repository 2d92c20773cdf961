"""A deliberately shifted copy of the held-out split, to test a classifier under distribution shift.

Each image gets exactly one moderate, realistic scanner/protocol shift: a contrast/gamma change,
blur, noise, JPEG re-compression, a rotation, or a crop that moves the brain off-centre and partly
out of frame. Shifts are assigned round-robin over :data:`SHIFTS` in a seeded random order, so each
covers about a sixth of the images; strengths are drawn from the same seeded generator, so a given
input and seed always give the same copy. Every shift keeps grey images grey (equal channels in,
equal channels out).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
import torchvision.transforms.v2.functional as F

SHIFTS: tuple[str, ...] = ("contrast_gamma", "blur", "noise", "jpeg", "rotation", "crop_shift")


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand((), generator=g).item()


def _sign(g: torch.Generator) -> int:
    return 1 if torch.rand((), generator=g).item() < 0.5 else -1


def _contrast_gamma(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    contrast, gamma = _uniform(g, 0.6, 1.5), _uniform(g, 0.7, 1.4)
    return F.adjust_gamma(F.adjust_contrast(img, contrast), gamma)


def _blur(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    sigma = _uniform(g, 1.0, 2.0)
    kernel = 2 * math.ceil(2 * sigma) + 1
    return F.gaussian_blur(img, [kernel, kernel], [sigma, sigma])


def _noise(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    # v2's gaussian_noise draws from the global RNG per channel; one seeded plane keeps grey grey
    std = _uniform(g, 8.0, 20.0)
    noise = torch.randn((1, *img.shape[-2:]), generator=g).to(img.device) * std
    return (img.float() + noise).round().clamp(0, 255).to(torch.uint8)


def _jpeg(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    quality = int(torch.randint(10, 31, (), generator=g).item())
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs for TorchCodec's
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        return F.jpeg(img, quality)


def _rotation(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    angle = _sign(g) * _uniform(g, 10.0, 25.0)
    return F.rotate(img, angle, interpolation=F.InterpolationMode.BILINEAR, fill=0)


def _crop_shift(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    height, width = img.shape[-2:]
    dx = round(_sign(g) * _uniform(g, 0.08, 0.15) * width)
    dy = round(_sign(g) * _uniform(g, 0.08, 0.15) * height)
    return F.affine(img, angle=0.0, translate=[dx, dy], scale=1.0, shear=[0.0, 0.0], fill=0)


_APPLY: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "contrast_gamma": _contrast_gamma,
    "blur": _blur,
    "noise": _noise,
    "jpeg": _jpeg,
    "rotation": _rotation,
    "crop_shift": _crop_shift,
}


def shifted_copy(images: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Shift each uint8 ``[N, 3, H, W]`` image once; return the copy and each image's shift."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected a uint8 [N, 3, H, W] tensor, got {images.dtype} {images.shape}")
    g = torch.Generator().manual_seed(seed)
    names = [""] * len(images)
    for rank, index in enumerate(torch.randperm(len(images), generator=g).tolist()):
        names[index] = SHIFTS[rank % len(SHIFTS)]
    out = images.clone()
    for index, name in enumerate(names):
        out[index] = _APPLY[name](images[index], g)
    return out, names

"""Image decoding and the deterministic preprocessing shared by training, evaluation and serving."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

IMAGE_MODE = "RGB"  # one mode for every image, whatever the file held (L, RGB, RGBA, P)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp")


# greyscale modes wider than 8 bits (16-bit PNG/TIFF, as MRI exports write them, and 32-bit)
WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageDecodeError(ValueError):
    """A file or payload is not a decodable image."""


def decode_image(source: bytes | Path | str) -> Image.Image:
    """Decode by content (a PNG named .jpg is fine; a DICOM file rendered as
    :mod:`brainmri.dicom` says) and convert to :data:`IMAGE_MODE`."""
    name = "payload" if isinstance(source, bytes) else str(source)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        if not data:
            raise ImageDecodeError(f"{name}: empty file (0 bytes)")
        from brainmri.dicom import DicomError, is_dicom, read_dicom  # it builds on this module

        if is_dicom(data):
            try:
                return read_dicom(data).image
            except DicomError as err:
                raise ImageDecodeError(f"{name}: {err}") from err
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # forces a full decode: truncated files fail here, not later
            if img.mode in WIDE_MODES:
                return to_8_bits(img).convert(IMAGE_MODE)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (0, 0, 0, 255))
                img = Image.alpha_composite(background, img)
            return img.convert(IMAGE_MODE)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as err:
        raise ImageDecodeError(f"{name}: not a readable image (unrecognised format)") from err
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"{name}: image too large to decode safely ({err})") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{name}: not a readable image ({err})") from err


def to_8_bits(image: Image.Image) -> Image.Image:
    """A wide greyscale image stretched linearly from its own darkest to brightest pixel onto
    0..255 (PIL's own conversion clips at 255, which turns a 16-bit slice almost all white);
    a constant image becomes black."""
    return Image.fromarray(stretch_to_uint8(np.asarray(image, dtype=np.float64)))  # mode L


def stretch_to_uint8(
    values: np.ndarray, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """``value_range`` (default: the finite values' lowest to highest) mapped linearly onto
    0..255, clipped, NaN as the lowest; an empty range gives zeros."""
    finite = values[np.isfinite(values)]
    if value_range is not None:
        low, high = value_range
    else:
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    stretched = (np.nan_to_num(values, nan=low) - low) * (255.0 / (high - low))
    return np.clip(np.rint(stretched), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class PreprocessConfig:
    """What turns a decoded image into the network's input; saved with every model."""

    image_size: int = 128
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    mode: str = field(default=IMAGE_MODE)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessConfig:
        return cls(
            image_size=int(data["image_size"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            mode=data.get("mode", IMAGE_MODE),
        )

    def resize(self) -> v2.Transform:
        """PIL image -> uint8 CHW tensor at the model's resolution."""
        size = (self.image_size, self.image_size)
        return v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True)])

    def normalize(self) -> v2.Transform:
        """uint8 tensor (C,H,W or N,C,H,W) -> normalised float tensor."""
        return v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(self.mean), list(self.std))]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """The full evaluation/serving transform of one decoded image."""
        return self.normalize()(self.resize()(image))

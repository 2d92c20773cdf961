"""A generated set of images that are not brain MRI slices: what an out-of-distribution detector
must reject (natural photos, noise, gradients, text, blank pages, a chest-X-ray-like image).

Every image is made deterministically from ``seed`` out of what ships with installed packages
(scikit-learn's two sample photos, Pillow's built-in font), so the set is the same on every
machine and nothing is downloaded. The kinds:

- ``photo``: crops of scikit-learn's sample photos, in colour and in greyscale (a greyscale
  photo is the hard case: an MRI slice is grey too);
- ``colour_noise``: uniform RGB noise, and smooth (blurred) colour noise;
- ``gradient``: linear and radial colour gradients;
- ``text``: lines of text rendered on a white or grey page;
- ``blank``: a single flat colour (black, white, grey, a tint);
- ``chest_xray``: a synthetic frontal chest radiograph: dark lungs, bright ribs, spine and
  heart shadow.

    python -m brainmri.non_mri OUT_DIR [--per-kind 8] [--size 256] [--seed 0]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from brainmri.images import PreprocessConfig

Maker = Callable[[np.random.Generator, int, int], Image.Image]

WORDS = [
    "patient",
    "report",
    "scan",
    "radiology",
    "department",
    "appointment",
    "contrast",
    "series",
    "protocol",
    "the",
    "of",
    "and",
    "invoice",
    "total",
    "amount",
    "date",
    "signature",
    "clinic",
    "weekly",
    "schedule",
    "meeting",
    "notes",
    "summary",
]


def _photo(rng: np.random.Generator, size: int, index: int) -> Image.Image:
    from sklearn.datasets import load_sample_images  # shipped with scikit-learn, no download

    photos = load_sample_images().images
    pixels = photos[index % len(photos)]
    side = int(rng.integers(min(pixels.shape[:2]) // 2, min(pixels.shape[:2])))
    top = int(rng.integers(0, pixels.shape[0] - side + 1))
    left = int(rng.integers(0, pixels.shape[1] - side + 1))
    image = Image.fromarray(pixels[top : top + side, left : left + side]).resize((size, size))
    return image.convert("L").convert("RGB") if index % 2 else image


def _colour_noise(rng: np.random.Generator, size: int, index: int) -> Image.Image:
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return image.filter(ImageFilter.GaussianBlur(size / 32)) if index % 2 else image


def _gradient(rng: np.random.Generator, size: int, index: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    if index % 2:
        t = np.hypot(x - rng.uniform(0.2, 0.8), y - rng.uniform(0.2, 0.8)) / np.sqrt(2)
    else:
        angle = rng.uniform(0, 2 * np.pi)
        t = (x * np.cos(angle) + y * np.sin(angle) + 1) / 2
    start, end = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels = start + (end - start) * np.clip(t, 0, 1)[..., None]
    return Image.fromarray(pixels.astype(np.uint8))


def _text(rng: np.random.Generator, size: int, index: int) -> Image.Image:
    page = Image.new("RGB", (size, size), "white" if index % 2 == 0 else (200, 200, 200))
    draw, font = ImageDraw.Draw(page), ImageFont.load_default(size=max(8, size // 16))
    for line in range(1, 12):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))
        draw.text((size // 16, line * size // 13), words, fill="black", font=font)
    return page


def _blank(rng: np.random.Generator, size: int, index: int) -> Image.Image:
    colours = [(0, 0, 0), (255, 255, 255), (128, 128, 128)]
    colour = colours[index] if index < len(colours) else tuple(rng.integers(0, 256, 3).tolist())
    return Image.new("RGB", (size, size), colour)


def _chest_xray(rng: np.random.Generator, size: int, index: int) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
    body = np.clip(1.2 - np.abs(x) ** 4 - 0.2 * y, 0, 1) * 0.75
    lungs = sum(
        np.exp(-(((x - side * rng.uniform(0.35, 0.45)) / 0.25) ** 2 + ((y + 0.05) / 0.55) ** 2))
        for side in (-1, 1)
    )
    image = body - 0.55 * np.clip(lungs, 0, 1)
    for rib in np.linspace(-0.6, 0.5, int(rng.integers(7, 10))):  # arcs across both lungs
        arc = rib + 0.25 * x**2
        image += 0.25 * np.exp(-(((y - arc) / 0.02) ** 2)) * (np.abs(x) < 0.75)
    image += 0.5 * np.exp(-((x / 0.07) ** 2)) * (y > -0.9)  # spine
    image += 0.35 * np.exp(-(((x - 0.12) / 0.22) ** 2 + ((y - 0.3) / 0.25) ** 2))  # heart
    image += rng.normal(0, 0.03, image.shape)
    return Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).convert("RGB")


KINDS: dict[str, Maker] = {
    "photo": _photo,
    "colour_noise": _colour_noise,
    "gradient": _gradient,
    "text": _text,
    "blank": _blank,
    "chest_xray": _chest_xray,
}


def non_mri_images(
    per_kind: int = 8, size: int = 256, seed: int = 0
) -> Iterator[tuple[str, int, Image.Image]]:
    """``(kind, index, image)`` for ``per_kind`` images of every kind, made from ``seed``."""
    for offset, (kind, make) in enumerate(KINDS.items()):
        rng = np.random.default_rng([seed, offset])
        for index in range(per_kind):
            yield kind, index, make(rng, size, index)


def non_mri_batch(
    preprocess: PreprocessConfig, per_kind: int = 8, seed: int = 0
) -> tuple[torch.Tensor, list[str]]:
    """The set resized as ``preprocess`` resizes (uint8 ``[N, 3, S, S]``), and each one's kind."""
    resize = preprocess.resize()
    made = list(non_mri_images(per_kind, seed=seed))
    images = torch.stack([resize(image.convert("RGB")) for _, _, image in made])
    return images, [kind for kind, _, _ in made]


def generate_non_mri_set(
    out_dir: Path, per_kind: int = 8, size: int = 256, seed: int = 0
) -> dict[str, list[Path]]:
    """Write ``per_kind`` PNG images of every kind into ``out_dir/<kind>/``: their paths."""
    written: dict[str, list[Path]] = {}
    for kind, index, image in non_mri_images(per_kind, size, seed):
        path = Path(out_dir) / kind / f"{kind}_{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        written.setdefault(kind, []).append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brainmri.non_mri", description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--per-kind", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    written = generate_non_mri_set(args.out_dir, args.per_kind, args.size, args.seed)
    print(f"wrote {sum(map(len, written.values()))} images to {args.out_dir}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""A small synthetic MRI-like 4-class dataset, so the workflow runs without the real data.

Each image is a noisy brain-shaped ellipse; the class decides the lesion: none (notumor), an
irregular intra-axial mass (glioma), a round dural-based mass at the brain's edge (meningioma) or
a small midline sellar mass (pituitary). Generation is deterministic for a given seed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from brainmri import CLASS_NAMES


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1) * 2 - 1
    return x, y


def _blob(
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    r: float,
    rng: np.random.Generator,
    irregular: float,
) -> np.ndarray:
    """A soft mask of a (possibly irregular) disc."""
    angle = np.arctan2(y - cy, x - cx)
    wobble = 1 + irregular * sum(
        rng.uniform(-1, 1) * np.sin(k * angle + rng.uniform(0, 6.3)) for k in (2, 3, 5)
    )
    dist = np.hypot(x - cx, y - cy) / (r * wobble)
    return np.clip(1.5 - 1.5 * dist, 0, 1) ** 0.5


def synthetic_slice_with_mask(
    label: str, rng: np.random.Generator, size: int = 128
) -> tuple[np.ndarray, np.ndarray]:
    """One uint8 grayscale slice of the given class and a bool mask of its visible lesion.

    The mask is where the lesion's soft blob exceeds 0.5; it is all False for notumor.
    """
    x, y = _grid(size)
    ax, ay = rng.uniform(0.70, 0.82), rng.uniform(0.80, 0.92)
    cx, cy = rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)
    brain = ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 < 1
    img = np.where(brain, 0.45, 0.02).astype(np.float32)
    img += brain * 0.10 * np.sin(9 * x + rng.uniform(0, 6)) * np.cos(7 * y)  # gyri-like texture
    img += np.where(np.abs(x - cx) < 0.02, -0.15, 0) * brain  # midline fissure
    lesion = np.zeros_like(img)
    if label == "glioma":
        lx, ly = cx + rng.choice([-1, 1]) * rng.uniform(0.2, 0.4), cy + rng.uniform(-0.35, 0.2)
        lesion = _blob(x, y, lx, ly, rng.uniform(0.16, 0.24), rng, irregular=0.25)
        core = _blob(x, y, lx, ly, rng.uniform(0.05, 0.08), rng, irregular=0.2)
        img += 0.45 * lesion - 0.35 * core
    elif label == "meningioma":
        theta = rng.uniform(0, 2 * np.pi)
        lx, ly = cx + 0.85 * ax * np.cos(theta), cy + 0.85 * ay * np.sin(theta)
        lesion = _blob(x, y, lx, ly, rng.uniform(0.13, 0.18), rng, irregular=0.03) * brain
        img += 0.5 * lesion
    elif label == "pituitary":
        lx, ly = cx + rng.uniform(-0.03, 0.03), cy + rng.uniform(0.30, 0.42)
        lesion = _blob(x, y, lx, ly, rng.uniform(0.08, 0.12), rng, irregular=0.05)
        img += 0.5 * lesion
    elif label != "notumor":
        raise ValueError(f"unknown class {label!r}; expected one of {CLASS_NAMES}")
    img += rng.normal(0, 0.04, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), lesion > 0.5


def synthetic_slice(label: str, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """One uint8 grayscale slice of the given class."""
    return synthetic_slice_with_mask(label, rng, size)[0]


def read_lesion_mask(mask_dir: Path, image_path: str) -> np.ndarray | None:
    """The bool lesion mask for ``image_path`` (relative, as the dataset lists it), or None."""
    path = Path(mask_dir) / image_path
    if not path.is_file():
        return None
    with Image.open(path) as mask:
        return np.asarray(mask.convert("L")) > 127


def lesion_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """The mask's bounding box (x0, y0, x1, y1), end-exclusive, or None when it is empty."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def generate_demo_dataset(
    out_dir: Path,
    per_class: int = 60,
    size: int = 128,
    seed: int = 0,
    progress: bool = True,
    mask_dir: Path | None = None,
) -> dict[str, int]:
    """Write ``out_dir/<class>/<class>_NNNN.png`` and return the count per class.

    With ``mask_dir``, also write each image's lesion mask (255 inside, 0 outside) to the same
    relative path under it; notumor masks are all zero.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    jobs = [(label, i) for label in CLASS_NAMES for i in range(per_class)]
    for label, i in tqdm(jobs, desc="demo images", unit="img", disable=not progress):
        rel = Path(label) / f"{label}_{i:04d}.png"
        img, mask = synthetic_slice_with_mask(label, rng, size)
        for root, pixels in ((out_dir, img), (mask_dir, mask.astype(np.uint8) * 255)):
            if root is not None:
                (Path(root) / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels, mode="L").save(Path(root) / rel)
    return {label: per_class for label in CLASS_NAMES}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mask-dir", type=Path, help="also write each image's lesion mask here")
    args = parser.parse_args(argv)
    counts = generate_demo_dataset(
        args.out_dir, args.per_class, args.size, args.seed, mask_dir=args.mask_dir
    )
    print(f"wrote {sum(counts.values())} images to {args.out_dir}")


if __name__ == "__main__":
    main()

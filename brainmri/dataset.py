"""Manifests and in-memory image sets: images decoded once, cached as uint8 tensors."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from brainmri.images import PreprocessConfig, decode_image

MANIFEST_FILE = "manifest.csv"
NEAR_PAIRS_FILE = "near_pairs.csv"  # ingest's near-duplicate pairs of kept images, by path
REQUIRED_COLUMNS = ("path", "label", "width", "height")  # every step relies on these


def read_manifest(path: Path) -> pd.DataFrame:
    """Load a manifest CSV and check it has the columns every step relies on."""
    frame = pd.read_csv(path)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {missing}; re-run the ingest step")
    return frame


def read_near_pairs(dataset_dir: Path) -> pd.DataFrame | None:
    """Ingest's near-duplicate pairs (path_a, path_b, distance, mirrored, kind), or None for a
    dataset ingested before they were recorded."""
    path = Path(dataset_dir) / NEAR_PAIRS_FILE
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype={"path_a": str, "path_b": str, "kind": str})


@dataclass
class ImageSet:
    """Decoded, resized images of one split as a uint8 tensor (N, 3, S, S) plus int labels."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def load_image_set(
    dataset_dir: Path,
    rows: pd.DataFrame,
    class_names: list[str],
    preprocess: PreprocessConfig,
    desc: str = "decode",
    workers: int = 4,
) -> ImageSet:
    """Decode every image listed in ``rows`` (paths relative to ``dataset_dir``) once."""
    resize = preprocess.resize()
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted(set(rows["label"]) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} are not among the model's classes {class_names}")
    paths = rows["path"].tolist()

    def decode(rel: str) -> torch.Tensor:
        return resize(decode_image(Path(dataset_dir) / rel))

    with ThreadPoolExecutor(max_workers=workers) as pool:
        tensors = list(
            tqdm(pool.map(decode, paths), total=len(paths), desc=desc, unit="img", leave=False)
        )
    size = preprocess.image_size
    images = torch.stack(tensors) if tensors else torch.empty(0, 3, size, size, dtype=torch.uint8)
    labels = torch.tensor([index[label] for label in rows["label"]], dtype=torch.long)
    return ImageSet(images, labels, paths)

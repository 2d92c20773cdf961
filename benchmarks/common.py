"""Helpers shared by the benchmarks: data locations, results files, a reduced copy of a data set,
and the bare torchvision training loop that throughput is compared against."""

from __future__ import annotations

import io
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from brainmri import CLASS_NAMES
from brainmri.demo_data import synthetic_slice
from brainmri.images import IMAGE_SUFFIXES, PreprocessConfig
from brainmri.model import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_TRAINING = REPO_ROOT.parent / "shared" / "data" / "brain-mri" / "Training"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
# the seed-0 model of the last accuracy benchmark: what the serving benchmarks serve
TRAINED_MODEL_DIR = REPO_ROOT / "local_outputs" / "bench" / "trained-model"


def write_json(result: dict[str, Any], path: Path) -> None:
    """Write ``result`` atomically (a ``.tmp`` file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".tmp")
    partial.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(partial, path)


def limited_copy(source: Path, dest: Path, per_class: int) -> Path:
    """``dest/<class>/`` holding links to the first ``per_class`` files of each class folder."""
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        target = dest / folder.name
        target.mkdir(parents=True, exist_ok=True)
        for file in sorted(f for f in folder.iterdir() if f.is_file())[:per_class]:
            (target / file.name).symlink_to(file.resolve())
    return dest


class _TorchvisionStyle(Dataset):
    """Per-sample transforms as in torchvision's classification reference (``presets.py``)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, preprocess: PreprocessConfig):
        self.images, self.labels = images, labels
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(preprocess.image_size, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(list(preprocess.mean), list(preprocess.std)),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


def bare_loop_throughput(
    backbone: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    preprocess: PreprocessConfig,
    batch_size: int,
    steps: int,
    device: torch.device,
    num_workers: int = 0,
    learning_rate: float = 1e-3,
    warmup_steps: int = 2,
    channels_last: bool = False,
    bf16: bool = False,
) -> dict[str, Any]:
    """Images/s of a plain whole-network training loop over cached uint8 images.

    The reference point for the train step's throughput: same backbone, batch size, device and
    threads; torchvision's reference transforms per sample, AdamW, no checkpoints, validation,
    metrics or progress bar (AMP on CUDA, as ``--amp`` there). ``channels_last=False`` is
    the plain loop; ``True`` gives it the train step's memory format, and ``bf16`` its CPU bf16
    autocast, which isolates the step's own overhead (augmentation, metrics, checkpoints) from
    the layout and precision speed-ups.
    """
    if len(images) < batch_size:
        raise ValueError(f"the bare loop needs a batch of {batch_size} images, got {len(images)}")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(backbone, int(labels.max()) + 1).to(device, memory_format=memory_format)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(
        _TorchvisionStyle(images, labels, preprocess),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    amp = device.type == "cuda"
    cpu_bf16 = bf16 and device.type == "cpu"
    done, seen, started = 0, 0, 0.0
    while done < steps + warmup_steps:
        for x, y in loader:
            if done == warmup_steps:
                if amp:
                    torch.cuda.synchronize()
                started, seen = time.perf_counter(), 0
            x = x.to(device, non_blocking=True).contiguous(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            with (
                torch.autocast("cpu", dtype=torch.bfloat16)
                if cpu_bf16
                else torch.autocast(device.type, enabled=amp)
            ):
                loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(y)
            done += 1
            if done == steps + warmup_steps:
                break
    if amp:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return {
        "images_per_s": seen / elapsed,
        "steps": steps,
        "batch_size": batch_size,
        "channels_last": channels_last,
        "precision": "bf16 autocast" if cpu_bf16 else ("autocast" if amp else "fp32"),
    }


def load_images(count: int) -> tuple[list[bytes], str]:
    """``count`` encoded slices, spread over the classes: the real data when present."""
    if SHARED_TRAINING.is_dir():
        files = sorted(p for p in SHARED_TRAINING.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        step = max(1, len(files) // count)
        return [p.read_bytes() for p in files[::step][:count]], str(SHARED_TRAINING)
    rng = np.random.default_rng(0)
    images = []
    for i in range(count):
        buffer = io.BytesIO()
        pixels = synthetic_slice(CLASS_NAMES[i % len(CLASS_NAMES)], rng, 512)
        Image.fromarray(pixels, mode="L").save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images, "synthetic 512 px JPEG slices (brainmri.demo_data)"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rate_summary(
    values: list[float], reference: list[float] | None, ratio_name: str
) -> dict[str, Any]:
    """Images/s measured once per round: the median, every round's figure, and the median of
    the per-round ratios to ``reference`` (measured in the same rounds) under ``ratio_name``
    (left out when there is no reference)."""
    summary: dict[str, Any] = {
        "images_per_s_median": statistics.median(values),
        "images_per_s": [round(v, 2) for v in values],
    }
    if reference is not None:
        ratios = (v / b for v, b in zip(values, reference, strict=True))
        summary[ratio_name] = statistics.median(ratios)
    return summary

"""Train: fit the classifier on the train split, keep the weights that score best on val.

One loop serves CPU and GPU. Pretrained backbones are fine-tuned in two phases: the new head
alone (backbone frozen, its batch-norm statistics too), then the whole network; each phase has
its own AdamW optimiser and a one-cycle (or cosine) schedule. Label smoothing, early stopping
on validation, deterministic per-epoch seeds. On CUDA: mixed precision (bf16 where supported,
else fp16 with loss scaling), pinned memory, channels-last, DataLoader workers. On a CPU: torch
threads set to the CPUs this process may use, no workers (the images are decoded once and cached
as uint8 tensors, so a worker would only compete with the compute threads for the cores).

With ``checkpoint_uri`` (``s3://bucket/prefix`` on MinIO, or a local folder) the full training
state is saved after every epoch and a retried run resumes after the last finished epoch.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from brainmri import CLASS_NAMES
from brainmri.dataset import ImageSet, load_image_set
from brainmri.model import (
    ModelBundle,
    available_cpus,
    build_model,
    configure_cpu_threads,
    get_backbone,
    head_parameters,
    load_pretrained_weights,
    pick_device,
)
from components.augment import AugmentConfig
from components.distributed import DistributedContext
from components.split import load_split

SCHEDULES = ("onecycle", "cosine")
CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = 1
# knobs that may differ between a run and its retry without invalidating the checkpoint
_RUNTIME_FIELDS = ("device", "num_workers", "cpu_threads")


@dataclass(frozen=True)
class TrainConfig:
    """Every training knob; saved in the model's metadata.

    The defaults are the small demo model (seconds on the generated set); real scans want
    :data:`REAL_DATA_RECIPE`, which the pipeline uses by default.
    """

    backbone: str = "tiny_cnn"
    image_size: int = 64
    epochs: int = 15  # all epochs, the head-only ones included
    batch_size: int = 32
    learning_rate: float = 0.0  # AdamW peak rate; 0 = the backbone's recommended rate
    weight_decay: float = 1e-4
    label_smoothing: float = 0.1
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    pretrained: bool = True  # start from ImageNet weights where the backbone has them
    head_epochs: int = 1  # phase 1 (pretrained backbones only): the new head alone; capped at
    # epochs - 1
    schedule: str = "onecycle"  # per phase: "onecycle" (warm-up + cosine) or "cosine"
    patience: int = 5  # epochs without a better val score before stopping (never in the first
    # half of the whole-network phase, while the one-cycle rate is still high); 0 = never stop
    num_workers: int = -1  # DataLoader workers; -1 = auto (CPU 0, CUDA min(8, CPUs))
    cpu_threads: int = 0  # torch threads on a CPU; 0 = every CPU this process may use
    amp: bool = True  # mixed precision on CUDA (ignored on a CPU)
    channels_last: bool = True

    def __post_init__(self) -> None:
        get_backbone(self.backbone)  # unknown names fail here, listing the choices
        for name in ("image_size", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.image_size < 32:
            raise ValueError(f"image_size={self.image_size} must be >= 32")
        if self.learning_rate < 0 or self.weight_decay < 0 or self.patience < 0:
            raise ValueError("learning_rate, weight_decay and patience must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} must be one of {SCHEDULES}")
        if self.head_epochs < 0:
            raise ValueError(f"head_epochs={self.head_epochs} must be >= 0")

    @property
    def peak_learning_rate(self) -> float:
        return self.learning_rate or get_backbone(self.backbone).learning_rate

    @property
    def head_only_epochs(self) -> int:
        """Phase-1 epochs actually run: none when the backbone starts from random weights, and
        never all of them (at least one whole-network epoch follows)."""
        pretrained = self.pretrained and get_backbone(self.backbone).has_pretrained_weights
        return min(self.head_epochs, self.epochs - 1) if pretrained else 0


# Real MRI data, duplicate-free held-out test split of the 5,712-image set: 99.0 % (split seed 0,
# benchmarks/results/accuracy.json) and 98.3 % (seed 1), 33-36 min on 2 CPU cores.
# The pipeline's default training recipe.
REAL_DATA_RECIPE = TrainConfig(backbone="efficientnet_lite0", image_size=192, epochs=14)


@dataclass
class TrainResult:
    """The saved bundle's folder and what each epoch measured."""

    model_dir: Path
    best_val_accuracy: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    training_seconds: float = 0.0
    stopped_early: bool = False
    resumed_from_epoch: int | None = None

    @property
    def images_per_s(self) -> float:
        """Steady-state training throughput: images / seconds over the whole-network epochs,
        leaving out the first one (warm-up: workers, kernels, allocator) when 3 or more ran."""
        epochs = [h for h in self.history if h["phase"] == "full"] or self.history
        epochs = epochs[1:] if len(epochs) >= 3 else epochs
        seconds = sum(h["train_images"] / h["images_per_s"] for h in epochs)
        return sum(h["train_images"] for h in epochs) / seconds if seconds else 0.0


class AugmentedImages(TorchDataset):
    """Cached uint8 images -> (augmented uint8 image, label); normalised later, per batch."""

    def __init__(self, data: ImageSet, augment: AugmentConfig | None, image_size: int) -> None:
        self.data = data
        self.augment = augment.transform(image_size) if augment else None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.data.images[i]
        if self.augment is not None:
            image = self.augment(image)
        return image, self.data.labels[i]


def split_fingerprint(frame: pd.DataFrame) -> str:
    """sha256 of the split manifest's rows (path, label, split and any content-hash column)."""
    columns = [c for c in ("path", "label", "split", "sha256", "content_hash") if c in frame]
    rows = frame[columns].sort_values(columns).to_csv(index=False)
    return hashlib.sha256(rows.encode()).hexdigest()


def dataset_fingerprint(dataset_dir: Path) -> str | None:
    """The content fingerprint ingest recorded for ``dataset_dir``, when it did."""
    try:
        report = json.loads((Path(dataset_dir) / "ingest_report.json").read_text())
    except (OSError, ValueError):
        return None
    return report.get("fingerprint") if isinstance(report, dict) else None


def resolve_workers(config: TrainConfig, device: torch.device) -> int:
    """DataLoader workers: as configured, else 0 on a CPU and min(8, CPUs) with CUDA."""
    if config.num_workers >= 0:
        return config.num_workers
    return min(8, available_cpus()) if device.type == "cuda" else 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Checkpoints:
    """The last training state, ``last.pt`` under an ``s3://`` prefix (MinIO) or a local folder."""

    def __init__(self, location: str, store: Any = None) -> None:
        self.location = location.rstrip("/")
        self._store = store

    @property
    def is_s3(self) -> bool:
        return self.location.startswith("s3://")

    def _s3(self) -> tuple[Any, Any]:
        from brainmri.storage import ObjectStore, S3Uri

        self._store = self._store or ObjectStore()
        return self._store, S3Uri.parse(self.location).child(CHECKPOINT_FILE)

    def __str__(self) -> str:
        return f"{self.location}/{CHECKPOINT_FILE}"

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none yet."""
        if not self.is_s3:
            path = Path(self.location) / CHECKPOINT_FILE
            if not path.is_file():
                return None
            return torch.load(path, map_location="cpu", weights_only=True)
        store, uri = self._s3()
        if not store.bucket_exists(uri.bucket) or not store.exists(uri):
            return None
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            path = store.download_file(uri, Path(tmp) / CHECKPOINT_FILE)
            return torch.load(path, map_location="cpu", weights_only=True)

    def save(self, state: dict[str, Any]) -> None:
        if not self.is_s3:
            folder = Path(self.location)
            folder.mkdir(parents=True, exist_ok=True)
            partial = folder / f"{CHECKPOINT_FILE}.partial"
            torch.save(state, partial)
            os.replace(partial, folder / CHECKPOINT_FILE)  # a crash never leaves half a file
            return
        store, uri = self._s3()
        store.ensure_bucket(uri.bucket)
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            path = Path(tmp) / CHECKPOINT_FILE
            torch.save(state, path)
            store.upload_file(path, uri)


def _phase_optimizer(
    model: nn.Module, phase: str, config: TrainConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters of ``phase`` and its per-step schedule."""
    head = {id(p) for p in head_parameters(model, config.backbone)}
    for p in model.parameters():
        p.requires_grad_(phase == "full" or id(p) in head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = config.peak_learning_rate
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=config.weight_decay)
    if config.schedule == "onecycle" and steps >= 4:  # a warm-up needs a few steps
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=steps, pct_start=max(0.2, 2 / steps)
        )
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    return optimizer, scheduler


def _set_mode(model: nn.Module, phase: str, backbone: str) -> None:
    """Train mode; in the head phase the frozen backbone (batch-norm statistics too) stays put."""
    if phase == "full":
        model.train()
    else:
        model.eval()
        model.get_submodule(get_backbone(backbone).head).train()


class _Runner:
    """Device placement, mixed precision and normalisation shared by training and validation."""

    def __init__(self, config: TrainConfig, device: torch.device, normalize: Any) -> None:
        self.device = device
        self.normalize = normalize
        self.memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        cuda = device.type == "cuda"
        self.amp = cuda and config.amp
        self.amp_dtype = (
            torch.bfloat16 if self.amp and torch.cuda.is_bf16_supported() else torch.float16
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp and not self.bf16)

    @property
    def bf16(self) -> bool:
        return self.amp_dtype == torch.bfloat16

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return self.normalize(images).contiguous(memory_format=self.memory_format)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)


def evaluate_loader(model: nn.Module, loader: DataLoader, runner: _Runner) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` over ``loader``."""
    model.eval()
    correct, total, loss_sum = 0, 0, 0.0
    with torch.inference_mode(), runner.autocast():
        for images, labels in loader:
            logits = model(runner.inputs(images)).float()
            labels = labels.to(runner.device, non_blocking=True)
            loss_sum += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(dim=1) == labels).sum())
            total += len(labels)
    return correct / max(total, 1), loss_sum / max(total, 1)


def train_model(
    dataset_dir: Path,
    split_csv: Path,
    out_dir: Path,
    config: TrainConfig,
    augment: AugmentConfig | None = None,
    progress: bool = True,
    checkpoint_uri: str | None = None,
    store: Any = None,
) -> TrainResult:
    """Train on the ``train`` rows of ``split_csv``, select on ``val``, save a model bundle.

    ``checkpoint_uri``: where to save the state after every epoch and resume from when it
    already holds a checkpoint of this very configuration and split (``s3://bucket/prefix``
    through :class:`brainmri.storage.ObjectStore`, optionally ``store``, or a local folder).
    """
    started = time.perf_counter()
    spec = get_backbone(config.backbone)
    ctx = DistributedContext.from_env()  # one process unless torchrun / a PyTorchJob set ranks
    device = ctx.device(pick_device(config.device))
    ctx.start(device)
    progress = progress and ctx.is_main
    threads = configure_cpu_threads(config.cpu_threads or None) if device.type == "cpu" else 0
    # cudnn.benchmark stays off: autotuning every conv shape (train, last batch, validation)
    # cost about a minute on an H200, more than a short fine-tuning run saves with it
    seed_everything(config.seed)
    class_names = list(CLASS_NAMES)
    preprocess = spec.preprocess(config.image_size)
    frame = load_split(split_csv)
    fingerprint = split_fingerprint(frame)
    sets = {
        name: load_image_set(
            dataset_dir,
            frame[frame["split"] == name],
            class_names,
            preprocess,
            desc=f"decode {name}",
            workers=max(4, available_cpus()),
        )
        for name in ("train", "val")
    }
    if len(sets["train"]) == 0 or len(sets["val"]) == 0:
        raise ValueError(f"{split_csv}: the train and val splits must both hold images")

    workers = resolve_workers(config, device)
    generator = torch.Generator()

    def loader(data: ImageSet, train: bool) -> DataLoader:
        dataset = AugmentedImages(data, augment if train else None, config.image_size)
        sampler = ctx.sampler(dataset, shuffle=True, seed=config.seed) if train else None
        return DataLoader(
            dataset,
            batch_size=config.batch_size if train else 2 * config.batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=train and len(data) >= 2 * config.batch_size,  # no tiny last batch for BN
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=device.type == "cuda",
            generator=generator,
        )

    train_loader, val_loader = loader(sets["train"], True), loader(sets["val"], False)
    runner = _Runner(config, device, preprocess.normalize())
    model = build_model(config.backbone, len(class_names))
    weights_source = load_pretrained_weights(model, config.backbone) if config.pretrained else None
    model.to(device, memory_format=runner.memory_format)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    head_epochs = config.head_only_epochs
    phase_epochs = {"head": head_epochs, "full": config.epochs - head_epochs}
    identity = {
        "config": {k: v for k, v in asdict(config).items() if k not in _RUNTIME_FIELDS},
        "augment": augment.to_dict() if augment else None,
        "split_fingerprint": fingerprint,
        "class_names": class_names,
    }
    checkpoints = Checkpoints(checkpoint_uri, store) if checkpoint_uri else None
    saved = checkpoints.load() if checkpoints else None
    if saved is not None and (
        saved.get("format") != CHECKPOINT_FORMAT or saved.get("identity") != identity
    ):
        print(f"checkpoint {checkpoints} belongs to another configuration or split; starting anew")
        saved = None

    history: list[dict[str, Any]] = []
    best = {"key": (-1.0, float("-inf")), "epoch": 0, "state": None}
    stale, start_epoch, finished, elapsed_before = 0, 1, False, 0.0
    resumed_from = None
    if saved is not None:
        model.load_state_dict(saved["model"])
        history, best, stale = saved["history"], saved["best"], saved["stale_epochs"]
        best["key"] = tuple(best["key"])
        start_epoch, finished = saved["epoch"] + 1, saved["finished"]
        elapsed_before = saved["training_seconds"]
        resumed_from = saved["epoch"]
        print(f"resuming from {checkpoints}: epoch {saved['epoch']} of {config.epochs} done")

    phase, optimizer, scheduler = None, None, None
    stopped_early = bool(saved and saved.get("stopped_early"))
    for epoch in range(start_epoch, config.epochs + 1):
        if finished:
            break
        epoch_phase = "head" if epoch <= head_epochs else "full"
        if epoch_phase != phase:
            steps = phase_epochs[epoch_phase] * len(train_loader)
            optimizer, scheduler = _phase_optimizer(model, epoch_phase, config, steps)
            # DDP syncs the parameters that train when it is built: rebuild it per phase
            network = ctx.wrap(model, device)
            if saved is not None and epoch == start_epoch and saved["phase"] == epoch_phase:
                optimizer.load_state_dict(saved["optimizer"])
                scheduler.load_state_dict(saved["scheduler"])
                if saved["scaler"] and runner.scaler.is_enabled():
                    runner.scaler.load_state_dict(saved["scaler"])
            elif phase is not None:
                stale = 0  # a new phase gets its own patience
            phase = epoch_phase
        seed_everything(config.seed * 10_000 + epoch)  # same shuffle and augmentation on resume
        generator.manual_seed(config.seed * 10_000 + epoch)
        if isinstance(train_loader.sampler, DistributedSampler):
            train_loader.sampler.set_epoch(epoch)
        _set_mode(model, phase, config.backbone)
        epoch_started, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        bar = tqdm(
            train_loader,
            desc=f"epoch {epoch}/{config.epochs} ({phase})",
            unit="batch",
            disable=not progress,
            leave=False,
        )
        for images, labels in bar:
            inputs = runner.inputs(images)
            labels = labels.to(device, non_blocking=True)
            with runner.autocast():
                logits = network(inputs)
                loss = loss_fn(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            runner.scaler.scale(loss).backward()
            runner.scaler.step(optimizer)
            runner.scaler.update()
            scheduler.step()
            seen += len(labels)
            loss_sum += loss.item() * len(labels)
            correct += int((logits.argmax(dim=1) == labels).sum())
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        train_seconds = time.perf_counter() - epoch_started
        totals = ctx.sum([seen, correct, loss_sum])  # over every rank's shard
        seen, correct, loss_sum = int(totals[0]), int(totals[1]), float(totals[2])
        # every rank scores the whole val split with the same weights: same early-stop decision
        val_accuracy, val_loss = evaluate_loader(model, val_loader, runner)
        history.append(
            {
                "epoch": epoch,
                "phase": phase,
                "learning_rate": scheduler.get_last_lr()[0],
                "train_loss": loss_sum / seen,
                "train_accuracy": correct / seen,
                "val_loss": val_loss,
                "val_accuracy": val_accuracy,
                "train_images": seen,
                "images_per_s": seen / train_seconds,
                "epoch_seconds": time.perf_counter() - epoch_started,
            }
        )
        print(json.dumps(history[-1]), flush=True)
        key = (val_accuracy, -val_loss)
        if key > best["key"]:
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            best, stale = {"key": key, "epoch": epoch, "state": state}, 0
        else:
            stale += 1
        stopped_early = (
            phase == "full"
            and config.patience > 0
            and stale >= config.patience
            and epoch - head_epochs >= (phase_epochs["full"] + 1) // 2
        )
        finished = stopped_early or epoch == config.epochs
        if stopped_early:
            print(f"early stop: {stale} epochs without a better val score (best: {best['epoch']})")
        if checkpoints is not None and ctx.is_main:
            checkpoints.save(
                {
                    "format": CHECKPOINT_FORMAT,
                    "identity": identity,
                    "epoch": epoch,
                    "phase": phase,
                    "finished": finished,
                    "stopped_early": stopped_early,
                    "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": runner.scaler.state_dict(),
                    "best": {**best, "key": list(best["key"])},
                    "stale_epochs": stale,
                    "history": history,
                    "training_seconds": elapsed_before + time.perf_counter() - started,
                }
            )

    model.load_state_dict(best["state"])
    training_seconds = elapsed_before + time.perf_counter() - started
    result = TrainResult(
        Path(out_dir),
        best_val_accuracy=best["key"][0],
        history=history,
        best_epoch=best["epoch"],
        training_seconds=training_seconds,
        stopped_early=stopped_early,
        resumed_from_epoch=resumed_from,
    )
    counts = frame.groupby(["split", "label"]).size().unstack(fill_value=0)
    bundle = ModelBundle(
        model.to("cpu", memory_format=torch.contiguous_format).eval(),
        config.backbone,
        class_names,
        preprocess,
        {
            "train_config": {**asdict(config), "peak_learning_rate": config.peak_learning_rate},
            "augment": augment.to_dict() if augment else None,
            "pretrained_weights": weights_source,
            "history": history,
            "best_val_accuracy": result.best_val_accuracy,
            "best_epoch": result.best_epoch,
            "stopped_early": stopped_early,
            "resumed_from_epoch": resumed_from,
            "training_seconds": training_seconds,
            "train_images_per_s": result.images_per_s,
            "device": str(device),
            "cpu_threads": threads or None,
            "dataloader_workers": workers,
            "torch_version": torch.__version__,
            "world_size": ctx.world_size,
            "data": {
                "dataset_fingerprint": dataset_fingerprint(dataset_dir),
                "split_fingerprint": fingerprint,
                "split_sizes": {s: int(n) for s, n in frame["split"].value_counts().items()},
                "class_counts": {
                    s: {c: int(n) for c, n in counts.loc[s].items()} for s in counts.index
                },
            },
        },
    )
    if ctx.is_main:
        bundle.save(out_dir)
    ctx.barrier()
    ctx.stop()
    return result

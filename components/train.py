"""Train: fit the classifier on the train split, keep the weights that score best on val.

Shaped like torchvision's classification reference: :func:`train_one_epoch` and :func:`evaluate`
are plain functions, :func:`train_model` drives them, and one loop serves CPU, GPU and DDP
(:mod:`components.distributed`). Pretrained backbones are fine-tuned in two phases: the new head
alone (backbone frozen, its batch-norm statistics too), then the whole network; each phase has
its own AdamW optimiser and schedule (one-cycle, cosine, or a constant head rate then warm-up and
cosine to zero), optionally an exponential moving average of the weights (kept when it scores
better on validation). Label smoothing, early stopping on validation, deterministic per-epoch
seeds. Mixed precision: bf16 autocast with fp32 master weights on CUDA (fp16 with loss scaling
where bf16 is missing) and on CPUs that compute bf16 natively (AVX-512-BF16, AMX), fp32 on others;
the path taken is logged and recorded. On CUDA: pinned memory, channels-last, DataLoader workers.
On a CPU: torch threads set to the CPU budget, no workers (the images are decoded once and cached
as uint8 tensors, so a worker would only compete with the compute threads for the cores).

With a ``checkpoint_uri`` (``s3://bucket/prefix`` on MinIO, or a local folder) the whole
training state is saved after every epoch and a retried run resumes after the last finished
epoch (:mod:`components.checkpoint`). What training did is one :class:`TrainResult`, saved as
the model bundle's metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.data import Dataset as TorchDataset
from tqdm import tqdm

from brainmri import CLASS_NAMES
from brainmri.backbones import get_backbone
from brainmri.cpu import cpu_budget, cpu_has_bf16, loaded_allocator
from brainmri.dataset import ImageSet, load_image_set
from brainmri.model import (
    ModelBundle,
    build_model,
    configure_cpu_threads,
    head_parameters,
    load_pretrained_weights,
    pick_device,
)
from brainmri.non_mri import non_mri_batch
from brainmri.storage import ObjectStore
from brainmri.trust import Outputs, Trust, fit_trust
from components.augment import BatchAugment, build_transform
from components.checkpoint import Checkpoints, TrainState
from components.config import AugmentConfig, TrainConfig, from_dict, to_dict
from components.distributed import DistributedContext
from components.ingest import recorded_fingerprint
from components.split import load_split, trained_on

# knobs that may differ between a run and its retry without invalidating the checkpoint
# knobs that change nothing of the weights: what is fitted after training on val
_TRUST_FIELDS = ("coverage", "false_flag_rate", "false_rejection_rate")
_RUNTIME_FIELDS = ("device", "num_workers", "cpu_threads", *_TRUST_FIELDS)
# the non-MRI images the OOD detectors are compared on (the benchmark's set uses seed 0)
PROBE_SEED, PROBE_PER_KIND = 1, 4
WARMUP_SHARE = 0.05  # warmup_cosine: the whole-network phase's linear warm-up, share of its steps


@dataclass(frozen=True)
class TrainRun:
    """Everything one training needs; every entry point (:func:`train_model`, and
    ``run_training``, ``launch_distributed_training`` and ``run_replica`` in
    :mod:`components.train_job`) takes one.

    ``dataset``, ``split_csv`` and ``output`` are local paths, or ``s3://`` URIs where a
    PyTorchJob replica fetches its inputs and rank 0 publishes the model. ``augment=None``
    trains without augmentation.
    """

    dataset: str
    split_csv: str
    output: str
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    checkpoint_uri: str | None = None

    def __post_init__(self) -> None:
        for name in ("dataset", "split_csv", "output"):  # Path in, location string kept
            object.__setattr__(self, name, str(getattr(self, name)))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainRun:
        values = json.loads(text)
        augment = values.pop("augment", None)
        return cls(
            **{**values, "train": from_dict(TrainConfig, values.get("train"))},
            augment=None if augment is None else from_dict(AugmentConfig, augment),
        )

    def at(self, **locations: str) -> TrainRun:
        """The same run with other locations (``dataset=``, ``split_csv=``, ``output=``)."""
        return replace(self, **locations)


@dataclass
class TrainResult:
    """What a training run did: saved as the model bundle's metadata, read back with
    :meth:`from_metadata` (the pipeline's metrics, the model card and the gate read it)."""

    train_config: dict[str, Any]  # every knob, plus the peak learning rate it resolved to
    augment: dict[str, Any] | None
    pretrained_weights: str | None  # where the ImageNet weights came from
    history: list[dict[str, Any]]  # one row per epoch
    best_val_accuracy: float
    best_epoch: int
    stopped_early: bool
    resumed_from_epoch: int | None
    training_seconds: float
    train_images_per_s: float  # steady state (see steady_images_per_s)
    device: str
    precision: str  # "bf16 autocast", "fp16 autocast" or "fp32": the path that ran
    selected_weights: str  # "raw", or "ema" when the moving average scored better on val
    cpu_threads: int | None
    dataloader_workers: int
    torch_version: str
    world_size: int
    data: dict[str, Any]  # fingerprints, split sizes and class counts of what it saw

    def metadata(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> TrainResult:
        return cls(**{f.name: metadata.get(f.name) for f in fields(cls)})


def steady_images_per_s(history: list[dict[str, Any]]) -> float:
    """Images / second over the whole-network epochs, leaving out the first one (warm-up:
    workers, kernels, allocator) when 3 or more ran."""
    epochs = [h for h in history if h["phase"] == "full"] or history
    epochs = epochs[1:] if len(epochs) >= 3 else epochs
    seconds = sum(h["train_images"] / h["images_per_s"] for h in epochs)
    return sum(h["train_images"] for h in epochs) / seconds if seconds else 0.0


class AugmentedImages(TorchDataset):
    """Cached uint8 images -> (augmented uint8 image, label); normalised later, per batch. A
    ``batched`` augmentation is left to the training loop (:class:`BatchAugment`)."""

    def __init__(self, data: ImageSet, augment: AugmentConfig | None, image_size: int) -> None:
        self.data = data
        per_sample = augment is not None and not augment.batched
        self.augment = build_transform(augment, image_size) if per_sample else None

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


def resolve_workers(config: TrainConfig, device: torch.device) -> int:
    """DataLoader workers: as configured, else 0 on a CPU and min(8, CPUs) with CUDA."""
    if config.num_workers >= 0:
        return config.num_workers
    return min(8, cpu_budget()) if device.type == "cuda" else 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _phase_optimizer(
    model: nn.Module, phase: str, config: TrainConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """AdamW over the trainable parameters of ``phase`` and its per-step schedule."""
    head = {id(p) for p in head_parameters(model, config.backbone)}
    for p in model.parameters():
        p.requires_grad_(phase == "full" or id(p) in head)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = config.peak_learning_rate * (config.head_learning_rate_scale if phase == "head" else 1)
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=config.weight_decay)
    schedulers = torch.optim.lr_scheduler
    if config.schedule == "warmup_cosine" and phase == "head":
        return optimizer, schedulers.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if config.schedule == "warmup_cosine" and steps >= 4:
        warmup = max(1, round(WARMUP_SHARE * steps))
        scheduler = schedulers.SequentialLR(
            optimizer,
            [
                schedulers.LinearLR(optimizer, start_factor=0.01, total_iters=warmup),
                schedulers.CosineAnnealingLR(optimizer, T_max=steps - warmup),
            ],
            milestones=[warmup],
        )
    elif config.schedule == "onecycle" and steps >= 4:  # a warm-up needs a few steps
        scheduler = schedulers.OneCycleLR(
            optimizer, max_lr=lr, total_steps=steps, pct_start=max(0.2, 2 / steps)
        )
    else:
        scheduler = schedulers.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
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

    def __init__(
        self,
        config: TrainConfig,
        device: torch.device,
        normalize: Any,
        augment: AugmentConfig | None = None,
    ) -> None:
        self.device = device
        self.normalize = normalize
        # a batched augmentation runs here, on the device; a per-sample one ran in the loader
        self.augment = BatchAugment(augment) if augment is not None and augment.batched else None
        self.memory_format = torch.channels_last if config.channels_last else torch.preserve_format
        cuda = device.type == "cuda"
        cpu_bf16 = config.cpu_bf16 and device.type == "cpu" and cpu_has_bf16()
        self.amp = (config.amp and cuda) or cpu_bf16
        bf16 = not cuda or torch.cuda.is_bf16_supported()
        self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and self.amp and not bf16)

    @property
    def precision(self) -> str:
        """The arithmetic that runs: ``bf16 autocast``, ``fp16 autocast`` or ``fp32``."""
        if not self.amp:
            return "fp32"
        return "bf16 autocast" if self.amp_dtype == torch.bfloat16 else "fp16 autocast"

    def inputs(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        """A uint8 batch on the device, normalised (batch-augmented first when ``train``)."""
        images = images.to(self.device, non_blocking=True)
        if train and self.augment is not None:
            images = self.augment(images)
        return self.normalize(images).contiguous(memory_format=self.memory_format)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)


@dataclass
class _Phase:
    """The optimiser, schedule and (DDP-wrapped) network of one fine-tuning phase, and the
    moving average of its weights when ``ema_decay`` asks for one (whole-network phase)."""

    name: str
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    network: nn.Module
    ema: AveragedModel | None = None


def _start_phase(name: str, s: _Setup, resume: TrainState | None) -> _Phase:
    """A fresh optimiser and schedule for phase ``name``; continued from ``resume`` when that
    checkpoint stopped inside this phase."""
    head_epochs = s.config.head_only_epochs
    epochs = head_epochs if name == "head" else s.config.epochs - head_epochs
    optimizer, scheduler = _phase_optimizer(s.model, name, s.config, epochs * len(s.train_loader))
    ema = None
    if name == "full" and s.config.ema_decay:  # batch-norm statistics averaged too
        averaging = get_ema_multi_avg_fn(s.config.ema_decay)
        ema = AveragedModel(s.model, multi_avg_fn=averaging, use_buffers=True)
    if resume is not None and resume.phase == name and resume.optimizer is not None:
        optimizer.load_state_dict(resume.optimizer)
        scheduler.load_state_dict(resume.scheduler)
        if resume.scaler and s.runner.scaler.is_enabled():
            s.runner.scaler.load_state_dict(resume.scaler)
        if ema is not None and resume.ema is not None:
            ema.load_state_dict(resume.ema)
    # DDP syncs the parameters that train when it is built: rebuild it per phase
    return _Phase(name, optimizer, scheduler, s.ctx.wrap(s.model, s.device), ema)


def train_one_epoch(
    phase: _Phase, loader: DataLoader, loss_fn: nn.Module, runner: _Runner, desc: str
) -> tuple[int, int, float]:
    """One pass over ``loader`` (a progress bar when ``desc``): images seen, correct, summed
    loss on this rank."""
    seen, correct, loss_sum = 0, 0, 0.0
    bar = tqdm(loader, desc=desc, unit="batch", disable=not desc, leave=False)
    for images, labels in bar:
        inputs = runner.inputs(images, train=True)
        labels = labels.to(runner.device, non_blocking=True)
        with runner.autocast():
            logits = phase.network(inputs)
            loss = loss_fn(logits.float(), labels)
        phase.optimizer.zero_grad(set_to_none=True)
        runner.scaler.scale(loss).backward()
        runner.scaler.step(phase.optimizer)
        runner.scaler.update()
        phase.scheduler.step()
        if phase.ema is not None:
            phase.ema.update_parameters(phase.network)
        seen += len(labels)
        loss_sum += loss.item() * len(labels)
        correct += int((logits.argmax(dim=1) == labels).sum())
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    return seen, correct, loss_sum


def evaluate(model: nn.Module, loader: DataLoader, runner: _Runner) -> tuple[float, float]:
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


class DivergedError(RuntimeError):
    """The loss stopped being a finite number: training cannot continue from these weights."""


def check_finite(row: dict[str, Any]) -> None:
    """Stop the run (before its epoch is checkpointed or anything saved) when a loss is NaN/inf."""
    bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(row[k])]
    if bad:
        raise DivergedError(
            f"{' and '.join(f'{k} = {row[k]}' for k in bad)} in epoch {row['epoch']} "
            f"({row['phase']} phase, learning rate {row['learning_rate']:.3g}): training "
            "diverged, nothing of this epoch was saved. Lower learning_rate, or check the "
            "images for corrupt pixels; a retry resumes from the last finished epoch."
        )


@dataclass
class _Setup:
    """What :func:`train_model` builds before its first epoch."""

    config: TrainConfig
    ctx: DistributedContext
    device: torch.device
    threads: int
    frame: pd.DataFrame
    train_loader: DataLoader
    val_loader: DataLoader
    workers: int
    generator: torch.Generator
    runner: _Runner
    model: nn.Module
    weights_source: str | None
    identity: dict[str, Any]


def _set_up(run: TrainRun) -> _Setup:
    """Processes, device and threads; the decoded train and val images and their loaders; the
    network (with its ImageNet weights); and the identity a checkpoint must match."""
    config = run.train
    ctx = DistributedContext.from_env()  # one process unless torchrun / a PyTorchJob set ranks
    device = ctx.device(pick_device(config.device))
    ctx.start(device)
    threads = configure_cpu_threads(config.cpu_threads or None) if device.type == "cpu" else 0
    # cudnn.benchmark stays off: autotuning every conv shape (train, last batch, validation)
    # cost about a minute on an H200, more than a short fine-tuning run saves with it
    seed_everything(config.seed)
    preprocess = get_backbone(config.backbone).preprocess(config.image_size)
    frame = load_split(Path(run.split_csv))
    workers, generator = resolve_workers(config, device), torch.Generator()
    train_loader, val_loader = (
        _loader(run, frame, name, ctx, device, workers, generator) for name in ("train", "val")
    )
    runner = _Runner(config, device, preprocess.normalize(), run.augment)
    if ctx.is_main:
        bf16 = "" if device.type != "cpu" else f"; CPU computes bf16 natively: {cpu_has_bf16()}"
        knobs = f"amp={config.amp}, cpu_bf16={config.cpu_bf16}{bf16}; malloc: {loaded_allocator()}"
        print(f"training on {device} in {runner.precision} ({knobs})", flush=True)
    model = build_model(config.backbone, len(CLASS_NAMES))
    weights_source = load_pretrained_weights(model, config.backbone) if config.pretrained else None
    model.to(device, memory_format=runner.memory_format)
    identity = {
        "config": {k: v for k, v in to_dict(config).items() if k not in _RUNTIME_FIELDS},
        "augment": to_dict(run.augment) if run.augment else None,
        "split_fingerprint": split_fingerprint(frame),
        "class_names": list(CLASS_NAMES),
    }
    return _Setup(
        config,
        ctx,
        device,
        threads,
        frame,
        train_loader,
        val_loader,
        workers,
        generator,
        runner,
        model,
        weights_source,
        identity,
    )


def _loader(
    run: TrainRun,
    frame: pd.DataFrame,
    split: str,
    ctx: DistributedContext,
    device: torch.device,
    workers: int,
    generator: torch.Generator,
) -> DataLoader:
    """The images of one split, decoded once; training ones shuffled (sharded under DDP) and
    augmented."""
    config, train = run.train, split == "train"
    preprocess = get_backbone(config.backbone).preprocess(config.image_size)
    rows = frame[frame["split"] == split]
    if rows.empty:
        raise ValueError(f"{run.split_csv}: the train and val splits must both hold images")
    data = load_image_set(
        Path(run.dataset),
        rows,
        list(CLASS_NAMES),
        preprocess,
        desc=f"decode {split}",
        workers=max(4, cpu_budget()),
    )
    dataset = AugmentedImages(data, run.augment if train else None, config.image_size)
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


def _resume(checkpoints: Checkpoints | None, s: _Setup) -> TrainState | None:
    """The checkpointed state of this very run, its weights loaded into the model; else None."""
    saved = checkpoints.load() if checkpoints else None
    if saved is None:
        return None
    resume = TrainState.from_checkpoint(saved, s.identity)
    if resume is None:
        print(f"checkpoint {checkpoints} belongs to another configuration or split; starting anew")
        return None
    s.model.load_state_dict(resume.model)
    print(f"resuming from {checkpoints}: epoch {resume.epoch} of {s.config.epochs} done")
    return resume


def _stops_early(state: TrainState, config: TrainConfig, phase: str) -> bool:
    """Patience ran out in the whole-network phase, past its first half (while the one-cycle
    rate is still high, a worse epoch is expected)."""
    whole_epochs = config.epochs - config.head_only_epochs
    return (
        phase == "full"
        and config.patience > 0
        and state.stale_epochs >= config.patience
        and state.epoch - config.head_only_epochs >= (whole_epochs + 1) // 2
    )


def _run_epoch(
    epoch: int, phase: _Phase, s: _Setup, loss_fn: nn.Module, progress: bool
) -> dict[str, Any]:
    """Train one epoch, score the model on val; the epoch's row of the history."""
    config, started = s.config, time.perf_counter()
    seed_everything(config.seed * 10_000 + epoch)  # same shuffle and augmentation on resume
    s.generator.manual_seed(config.seed * 10_000 + epoch)
    if isinstance(s.train_loader.sampler, DistributedSampler):
        s.train_loader.sampler.set_epoch(epoch)
    _set_mode(s.model, phase.name, config.backbone)
    desc = f"epoch {epoch}/{config.epochs} ({phase.name})" if progress and s.ctx.is_main else ""
    stats = train_one_epoch(phase, s.train_loader, loss_fn, s.runner, desc)
    seen, correct, loss_sum = s.ctx.sum(list(stats))  # over every rank's shard
    train_seconds = time.perf_counter() - started
    # every rank scores the whole val split with the same weights: same early-stop decision
    val_accuracy, val_loss = evaluate(s.model, s.val_loader, s.runner)
    averaged = {}
    if phase.ema is not None:
        ema_accuracy, ema_loss = evaluate(phase.ema, s.val_loader, s.runner)
        averaged = {"ema_val_accuracy": ema_accuracy, "ema_val_loss": ema_loss}
    return {
        "epoch": epoch,
        "phase": phase.name,
        "learning_rate": phase.scheduler.get_last_lr()[0],
        "train_loss": loss_sum / seen,
        "train_accuracy": correct / seen,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "train_images": int(seen),
        "images_per_s": seen / train_seconds,
        "epoch_seconds": time.perf_counter() - started,
    } | averaged


def train_model(
    run: TrainRun,
    progress: bool = True,
    store: ObjectStore | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train on the ``train`` rows of the split, select on ``val``, save the bundle to
    ``run.output`` (a local folder); resumes from ``run.checkpoint_uri`` when it holds a
    checkpoint of this very configuration and split (through ``store`` for ``s3://``).
    ``on_epoch`` gets each epoch's row of the history as it is done (on rank 0)."""
    started, config, s = time.perf_counter(), run.train, _set_up(run)
    checkpoints = Checkpoints(run.checkpoint_uri, store) if run.checkpoint_uri else None
    resume = _resume(checkpoints, s)
    state = resume or TrainState()
    resumed_from, elapsed_before = (resume.epoch if resume else None), state.training_seconds
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    phase: _Phase | None = None
    for epoch in range(state.epoch + 1, config.epochs + 1):
        if state.finished:
            break
        name = "head" if epoch <= config.head_only_epochs else "full"
        if phase is None or phase.name != name:
            if phase is not None:
                state.stale_epochs = 0  # a new phase gets its own patience
            phase = _start_phase(name, s, resume if phase is None else None)
        row = _run_epoch(epoch, phase, s, loss_fn, progress)
        check_finite(row)
        state.phase = name
        state.record(row, s.model, phase.ema.module if phase.ema is not None else None)
        print(json.dumps(row), flush=True)
        if on_epoch is not None and s.ctx.is_main:
            on_epoch(row)
        state.stopped_early = _stops_early(state, config, name)
        state.finished = state.stopped_early or epoch == config.epochs
        if state.stopped_early:
            best = f"best: epoch {state.best_epoch}"
            print(f"early stop: {state.stale_epochs} epochs without a better val score ({best})")
        state.training_seconds = elapsed_before + time.perf_counter() - started
        if checkpoints is not None and s.ctx.is_main:
            live = (s.model, phase.optimizer, phase.scheduler, s.runner.scaler, phase.ema)
            checkpoints.save(state.to_checkpoint(s.identity, *live))
    state.training_seconds = elapsed_before + time.perf_counter() - started
    return _finish(run, s, state, resumed_from)


def fit_bundle_trust(
    bundle: ModelBundle,
    train: Outputs,
    train_labels: torch.Tensor,
    val: Outputs,
    val_labels: torch.Tensor,
    config: TrainConfig,
) -> Trust:
    """Calibration, prediction sets and the uncertainty threshold fitted on ``val``'s outputs;
    the OOD detectors on ``train``'s features, the one kept that better tells ``val`` from a
    generated non-MRI probe set."""
    probe, _ = non_mri_batch(bundle.preprocess, PROBE_PER_KIND, PROBE_SEED)
    return fit_trust(
        train,
        train_labels,
        val,
        val_labels,
        bundle.forward_images(probe),
        config.coverage,
        config.false_flag_rate,
        config.false_rejection_rate,
    )


def _finish(run: TrainRun, s: _Setup, state: TrainState, resumed_from: int | None) -> TrainResult:
    """Load the best weights, build the :class:`TrainResult` and save the bundle (rank 0)."""
    s.model.load_state_dict(state.best_weights)
    counts = s.frame.groupby(["split", "label"]).size().unstack(fill_value=0)
    config = run.train
    result = TrainResult(
        train_config={**to_dict(config), "peak_learning_rate": config.peak_learning_rate},
        augment=to_dict(run.augment) if run.augment else None,
        pretrained_weights=s.weights_source,
        history=state.history,
        best_val_accuracy=state.best_score[0],
        best_epoch=state.best_epoch,
        stopped_early=state.stopped_early,
        resumed_from_epoch=resumed_from,
        training_seconds=state.training_seconds,
        train_images_per_s=steady_images_per_s(state.history),
        device=str(s.device),
        precision=s.runner.precision,
        selected_weights=state.best_source,
        cpu_threads=s.threads or None,
        dataloader_workers=s.workers,
        torch_version=torch.__version__,
        world_size=s.ctx.world_size,
        data={
            "dataset_fingerprint": recorded_fingerprint(Path(run.dataset)),
            "split_fingerprint": s.identity["split_fingerprint"],
            "trained_on": trained_on(s.frame),  # what the gate keeps out of a comparison
            "split_sizes": {k: int(n) for k, n in s.frame["split"].value_counts().items()},
            "class_counts": {
                split: {c: int(n) for c, n in counts.loc[split].items()} for split in counts.index
            },
        },
    )
    preprocess = get_backbone(config.backbone).preprocess(config.image_size)
    model = s.model.to("cpu", memory_format=torch.contiguous_format).eval()
    bundle = ModelBundle(
        model,
        config.backbone,
        list(CLASS_NAMES),
        preprocess,
        result.metadata(),
        test_time_flip=config.test_time_flip,
    )
    if s.ctx.is_main:
        train, val = s.train_loader.dataset.data, s.val_loader.dataset.data
        bundle.trust = fit_bundle_trust(
            bundle,
            bundle.forward_images(train.images, desc="features of train"),
            train.labels,
            bundle.forward_images(val.images, desc="outputs of val"),
            val.labels,
            config,
        )
        print(f"trust fitted on val: {json.dumps(bundle.trust.to_dict())}", flush=True)
        bundle.save(Path(run.output), export=True)  # with the network as ONNX, for serving
    s.ctx.barrier()
    s.ctx.stop()
    return result

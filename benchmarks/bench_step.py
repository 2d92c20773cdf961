"""Training-step levers, measured against each other in one process: ``make bench-step``.

    python -m benchmarks.bench_step [--image-size 192] [--batch-size 32] [--rounds 5]

Each lever is a way to build the network; every round times ``--steps`` whole-network training
steps (AdamW, cross-entropy, channels-last, fp32, random uint8-range input) of each lever, in
alternating order, so that a noisy shared machine slows all of them alike. The figure is each
lever's median images/s over the rounds and its median ratio to the baseline within a round,
with the minor page faults per step (memory churn: the allocator handing large activation
buffers back to the kernel and faulting them in again; :mod:`benchmarks.bench_allocator`
compares allocators). Writes ``benchmarks/results/step_levers.json``. The levers today:

- ``package padding``: EfficientNet-Lite0 as the ``efficientnet_lite_pytorch`` package builds
  it (TF-"same" padding by ``F.pad`` before every convolution);
- ``native padding``: the project's build (:func:`brainmri.backbones.native_same_padding`);
- ``+ bf16 autocast``: its forward pass under ``torch.autocast("cpu", torch.bfloat16)``;
- ``+ torch.compile``: the model compiled by inductor (the compile is in the warm-up steps);
- ``+ bf16 autocast + torch.compile``: both;
- ``+ torch.compile of the whole step``: the model and the AdamW step compiled (the forward and
  backward graphs come from compiling the model; the optimizer is the rest of the step);
- ``+ fused AdamW``: ``AdamW(fused=True)``, the update of every parameter in one kernel.

Each round also times the recipe's augmentation on a batch of uint8 images, per sample (as the
train step's DataLoader runs ``build_transform``) and batched (:class:`BatchAugment`): its share
of a training step, and each lever's images/s with it (on a CPU the two run one after the other):
the old recipe's step is ``package padding`` with ``per sample``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import RESULTS_DIR, rate_summary, write_json
from brainmri import CLASS_NAMES
from brainmri.cpu import cpu_budget, loaded_allocator
from brainmri.model import build_model
from components.augment import BatchAugment, build_transform
from components.config import AugmentConfig, TrainConfig


def package_lite0() -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(
        "efficientnet-lite0", num_classes=len(CLASS_NAMES), image_size=None
    )


def project_lite0() -> nn.Module:
    return build_model("efficientnet_lite0", len(CLASS_NAMES))


@dataclass(frozen=True)
class Lever:
    """A way to build the network and run its step."""

    build: Callable[[], nn.Module]
    bf16_autocast: bool = False  # the forward pass under CPU bf16 autocast, fp32 master weights
    compiled: bool = False  # torch.compile of the model (inductor; needs a C compiler)
    compiled_optimizer: bool = False  # torch.compile of the optimizer step too: the whole step
    fused_optimizer: bool = False  # AdamW(fused=True): one kernel over every parameter


LEVERS: dict[str, Lever] = {
    "package padding": Lever(package_lite0),
    "native padding": Lever(project_lite0),
    "native padding + bf16 autocast": Lever(project_lite0, bf16_autocast=True),
    "native padding + torch.compile": Lever(project_lite0, compiled=True),
    "native padding + bf16 autocast + torch.compile": Lever(
        project_lite0, bf16_autocast=True, compiled=True
    ),
    "native padding + torch.compile of the whole step": Lever(
        project_lite0, compiled=True, compiled_optimizer=True
    ),
    "native padding + fused AdamW": Lever(project_lite0, fused_optimizer=True),
}
BASELINE = "package padding"


@dataclass(frozen=True)
class StepTiming:
    images_per_s: float
    minor_faults_per_step: float


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_steps(
    model: nn.Module, lever: Lever, images: torch.Tensor, labels: torch.Tensor, steps: int
) -> StepTiming:
    """Whole-network training steps: images per second and minor page faults per step (two
    warm-up steps first)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=lever.fused_optimizer or None)
    update = torch.compile(optimizer.step) if lever.compiled_optimizer else optimizer.step
    model.train()
    for step in range(steps + 2):
        if step == 2:
            started, faults = time.perf_counter(), minor_faults()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=lever.bf16_autocast):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        update()
    seconds = time.perf_counter() - started
    return StepTiming(images.shape[0] * steps / seconds, (minor_faults() - faults) / steps)


AUGMENTATIONS = ("per sample", "batched")


def augmentation_seconds(images: torch.Tensor, way: str) -> float:
    """Seconds the recipe's augmentation takes over one batch of uint8 images, ``way`` one of
    :data:`AUGMENTATIONS`."""
    config = AugmentConfig()
    per_sample, batched = build_transform(config, images.shape[-1]), BatchAugment(config)
    started = time.perf_counter()
    if way == "batched":
        batched(images)
    else:
        for image in images:
            per_sample(image)
    return time.perf_counter() - started


def prepare(lever: Lever) -> nn.Module:
    model = lever.build().to(memory_format=torch.channels_last)
    return torch.compile(model) if lever.compiled else model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_step", description=__doc__)
    parser.add_argument(
        "--image-size", type=int, default=TrainConfig().image_size, help="default: the recipe's"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--levers", nargs="*", choices=list(LEVERS), help="default: all (the baseline always runs)"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="only --levers (no ratios to the baseline)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "step_levers.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(cpu_budget())
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    images = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, len(CLASS_NAMES), (args.batch_size,))
    chosen = {*(args.levers or LEVERS), *([] if args.no_baseline else [BASELINE])}
    levers = {name: lever for name, lever in LEVERS.items() if name in chosen}
    models = {name: prepare(lever) for name, lever in levers.items()}
    rates: dict[str, list[float]] = {name: [] for name in levers}
    faults: dict[str, list[float]] = {name: [] for name in levers}
    raw = torch.randint(0, 256, shape, dtype=torch.uint8)
    augment: dict[str, list[float]] = {way: [] for way in AUGMENTATIONS}
    for round_number in range(args.rounds):
        order = list(models) if round_number % 2 == 0 else list(reversed(models))
        for name in order:
            timing = time_steps(models[name], levers[name], images, labels, args.steps)
            rates[name].append(timing.images_per_s)
            faults[name].append(timing.minor_faults_per_step)
        for way, seconds in augment.items():
            seconds.append(augmentation_seconds(raw, way))
        print(f"round {round_number}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()))
    step_seconds = {name: args.batch_size / statistics.median(r) for name, r in rates.items()}
    augment_seconds = {way: statistics.median(seconds) for way, seconds in augment.items()}
    result = {
        "benchmark": "step_levers",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "setup": {k: v for k, v in vars(args).items() if k != "out"}
        | {
            "threads": torch.get_num_threads(),
            "precision": "fp32 master weights",
            "allocator": loaded_allocator(),
        },
        "baseline": BASELINE if BASELINE in rates else None,
        "levers": {
            name: rate_summary(values, rates.get(BASELINE), "ratio_to_baseline_median")
            | {"minor_faults_per_step_median": statistics.median(faults[name])}
            for name, values in rates.items()
        },
        "augmentation": {
            way: {
                "seconds_per_batch": augmenting,
                "share_of_step": {  # of a step that augments its batch, then trains on it
                    name: augmenting / (augmenting + seconds)
                    for name, seconds in step_seconds.items()
                },
                "images_per_s_with_it": {  # the CPU augments, then trains: one after the other
                    name: args.batch_size / (augmenting + seconds)
                    for name, seconds in step_seconds.items()
                },
            }
            for way, augmenting in augment_seconds.items()
        },
    }
    write_json(result, args.out)
    for name, figures in result["levers"].items():
        ratio = figures.get("ratio_to_baseline_median")
        print(
            f"{name:16s} {figures['images_per_s_median']:.1f} img/s"
            + (f", {ratio:.2f}x {BASELINE}" if ratio else "")
            + f", {figures['minor_faults_per_step_median']:,.0f} minor faults a step; augmentation "
            + ", ".join(
                f"{way} {figures['share_of_step'][name]:.0%}"
                for way, figures in result["augmentation"].items()
            )
            + " of the step"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

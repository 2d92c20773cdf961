"""Whole training epochs of the recipe, trained the old way and the new, each in its own process.

    make bench-train-speed
    python -m benchmarks.bench_train_speed [--limit-per-class 120] [--rounds 3]

Where :mod:`benchmarks.bench_step` times the network's step alone, this times what a training
run does per image: a PyTorchJob replica (``python -m components.train_job``, the real entry
point) training the recipe on real MRI slices (``--limit-per-class`` of each class of
``../shared/data/brain-mri/Training``, ingested and split as the pipeline does), its DataLoader
decoding and augmenting, the step, validation. Each variant adds one speed lever to the way the
recipe trained before (augmentation per sample in the DataLoader, fp32, glibc's malloc): batched
augmentation, tcmalloc, CPU bf16 autocast. Every variant runs once per round in a fresh process,
in alternating order, so a noisy shared machine slows all of them alike; the figure is each
variant's median images/s of its last whole-network epoch (warmed up) and its median ratio to
the old way within a round. Writes ``benchmarks/results/train_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.bench_accuracy import prepare_default_split
from benchmarks.bench_allocator import child_environment, refuse_unloaded
from benchmarks.common import RESULTS_DIR, SHARED_TRAINING, rate_summary, write_json
from components.config import AugmentConfig, TrainConfig
from components.train import TrainRun


@dataclass(frozen=True)
class Variant:
    """How a training run is executed: the levers that change its speed, not its recipe."""

    batched: bool  # augmentation batched on the device (else per sample in the DataLoader)
    cpu_bf16: bool  # bf16 autocast where the CPU computes bf16 natively
    allocator: str  # a name of bench_allocator.ALLOCATORS


# one lever added at a time, from the way the recipe trained before (the first, the reference)
VARIANTS: dict[str, Variant] = {
    "old: per-sample augmentation, fp32, glibc": Variant(False, False, "glibc"),
    "batched augmentation, fp32, glibc": Variant(True, False, "glibc"),
    "batched augmentation, fp32, tcmalloc": Variant(True, False, "tcmalloc"),
    "new: batched augmentation, bf16, tcmalloc": Variant(True, True, "tcmalloc"),
}
REFERENCE = next(iter(VARIANTS))


def train_in_process(variant: str, run: TrainRun, output: Path) -> float:
    """Train ``run`` into ``output`` as one replica in a fresh process on the variant's
    augmentation and allocator: the images/s of its last whole-network epoch."""
    way = VARIANTS[variant]
    augment = replace(run.augment or AugmentConfig(), batched=way.batched)
    train = replace(run.train, cpu_bf16=way.cpu_bf16)
    run = replace(run, output=str(output), train=train, augment=augment)
    command = [sys.executable, "-m", "components.train_job", "--train-run", run.to_json()]
    done = subprocess.run(
        command, env=child_environment(way.allocator), capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"{variant}: training failed\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    lines = done.stdout.splitlines()
    loaded = next(line.rsplit("malloc ", 1)[1] for line in lines if line.startswith("replica "))
    refuse_unloaded(way.allocator, loaded)
    rows = [json.loads(line) for line in lines if line.startswith('{"epoch"')]
    return next(row["images_per_s"] for row in reversed(rows) if row["phase"] == "full")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_train_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=SHARED_TRAINING, help="<class>/<image> tree")
    parser.add_argument("--limit-per-class", type=int, default=120)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument(
        "--image-size", type=int, default=TrainConfig().image_size, help="default: the recipe's"
    )
    parser.add_argument("--backbone", default=TrainConfig().backbone)
    parser.add_argument("--epochs", type=int, default=3, help="1 head-only, then whole-network")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "train_speed.json")
    args = parser.parse_args(argv)
    args.variants = [REFERENCE, *(v for v in args.variants if v != REFERENCE)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"skipped: no data at {args.data} (the real MRI set lives in ../shared/data)")
        return 0
    rates: dict[str, list[float]] = {name: [] for name in args.variants}
    with tempfile.TemporaryDirectory(prefix="bench-train-speed-") as scratch:
        work = Path(scratch)
        _, dataset, split = prepare_default_split(args.data, work, args.limit_per_class)
        config = TrainConfig(
            backbone=args.backbone, image_size=args.image_size, epochs=args.epochs, patience=0
        )
        run = TrainRun(dataset, work / "split.csv", work / "model", config, AugmentConfig())
        models = work / "models"
        for round_number in range(args.rounds):
            order = args.variants if round_number % 2 == 0 else args.variants[::-1]
            for number, name in enumerate(order):
                output = models / f"round{round_number}-{number}"
                rates[name].append(train_in_process(name, run, output))
            print(
                f"round {round_number}: "
                + ", ".join(f"{n} {r[-1]:.1f} img/s" for n, r in rates.items()),
                flush=True,
            )
        train_images = int((split["split"] == "train").sum())
    result: dict[str, Any] = {
        "benchmark": "train_speed",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "setup": {
            k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"
        }
        | {"reference": REFERENCE, "train_images": train_images},
        "variants": {
            name: asdict(VARIANTS[name])
            | rate_summary(values, rates[REFERENCE], "ratio_to_old_median")
            for name, values in rates.items()
        },
    }
    write_json(result, args.out)
    for name, figures in result["variants"].items():
        print(
            f"{name:43s} {figures['images_per_s_median']:.1f} img/s, "
            f"{figures['ratio_to_old_median']:.2f}x the old way"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

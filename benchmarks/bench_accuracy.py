"""Accuracy benchmark: the real data, a duplicate-free held-out test split, the default CPU recipe.

    python -m benchmarks.bench_accuracy            # full run (~38 min on 2 idle CPU cores)
    python -m benchmarks.bench_accuracy --smoke    # a minute-long check that everything runs

Ingests ``../shared/data/brain-mri/Training`` with the project's ingest (pixel-identical copies
collapse to one), splits it with the project's split (stratified, grouped by pixel content),
trains with ``components.train.train_model``, scores the untouched test split with
``components.evaluate``, measures a bare torchvision training loop on the same backbone and batch
size in the same process, and writes ``benchmarks/results/accuracy.json``: accuracy, balanced
accuracy, per-class recall, training minutes, images/s, and the throughput ratio to the bare loop.
Goals (issue #5): accuracy >= 98.7 %, training <= 60 min on 2 CPU cores, ratio >= 0.9.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from benchmarks.common import (
    RESULTS_DIR,
    SHARED_TRAINING,
    bare_loop_throughput,
    limited_copy,
    write_json,
)
from brainmri import CLASS_NAMES
from brainmri.backbones import get_backbone
from brainmri.dataset import MANIFEST_FILE, load_image_set, read_manifest
from brainmri.model import pick_device
from components.config import (
    TEST_FRACTION,
    VAL_FRACTION,
    AugmentConfig,
    TrainConfig,
    add_flags,
    pop_flags,
    to_dict,
)
from components.evaluate import evaluate_model
from components.ingest import IngestReport, ingest_dataset
from components.split import leaked_groups, split_manifest
from components.train import TrainRun, resolve_workers, train_model

GOALS = {"accuracy": 0.987, "training_minutes": 60.0, "throughput_ratio": 0.9}
SMOKE = {"limit_per_class": 20, "bare_steps": 3}
SMOKE_TRAINING = {"epochs": 2, "image_size": 64}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's own flags, and every TrainConfig / AugmentConfig knob as a flag (defaults:
    the pipeline's recipe), folded into ``args.train`` and ``args.augment``."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=SHARED_TRAINING, help="<class>/<image> tree")
    parser.add_argument("--out", type=Path, help="result JSON (default: results/accuracy.json)")
    parser.add_argument("--val-fraction", type=float, default=VAL_FRACTION)
    parser.add_argument("--test-fraction", type=float, default=TEST_FRACTION)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--limit-per-class", type=int, default=0, help="0: every image")
    parser.add_argument("--bare-steps", type=int, default=30, help="timed steps of the bare loop")
    parser.add_argument("--workdir", type=Path, help="keep the dataset and model here")
    parser.add_argument("--checkpoint-dir", help="resume an interrupted run from here")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny run to check the benchmark works: {SMOKE | SMOKE_TRAINING}; writes "
        "accuracy_smoke.json",
    )
    add_flags(parser, TrainConfig(), "training (TrainConfig)")
    add_flags(parser, AugmentConfig(), "augmentation (AugmentConfig)")
    args = parser.parse_args(argv)
    values = vars(args)
    args.train, args.augment = pop_flags(values, TrainConfig()), pop_flags(values, AugmentConfig())
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.train = replace(args.train, **SMOKE_TRAINING)
    args.out = args.out or RESULTS_DIR / ("accuracy_smoke.json" if args.smoke else "accuracy.json")
    return args


def prepare(args: argparse.Namespace, work: Path) -> tuple[IngestReport, Path, pd.DataFrame]:
    """Ingest (pixel-identical copies collapse) and split (grouped by content, leakage-checked)
    the data into ``work``: the ingest report, the dataset folder, the split manifest."""
    source = args.data
    if args.limit_per_class:
        source = limited_copy(args.data, work / "source", args.limit_per_class)
    print(f"ingest {source}", flush=True)
    report = ingest_dataset(str(source), work / "dataset")
    manifest = read_manifest(work / "dataset" / MANIFEST_FILE)
    split = split_manifest(manifest, args.val_fraction, args.test_fraction, args.split_seed)
    split.to_csv(work / "split.csv", index=False)
    return report, work / "dataset", split


def bare_loops(
    args: argparse.Namespace, dataset: Path, split: pd.DataFrame
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bare torchvision loop's throughput on the same backbone, batch and device: plain,
    and in channels-last (the train step's memory format)."""
    config = args.train
    device = pick_device(config.device)
    preprocess = get_backbone(config.backbone).preprocess(config.image_size)
    sample = split[split["split"] == "train"].head(config.batch_size * (args.bare_steps + 2))
    cached = load_image_set(dataset, sample, list(CLASS_NAMES), preprocess, desc="decode bare")
    plain, channels_last = (
        bare_loop_throughput(
            config.backbone,
            cached.images,
            cached.labels,
            preprocess,
            config.batch_size,
            args.bare_steps,
            device,
            num_workers=resolve_workers(config, device),
            learning_rate=config.peak_learning_rate,
            channels_last=layout,
        )
        for layout in (False, True)
    )
    return plain, channels_last


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Prepare, train, score, compare with the bare loop; the result record (long: it is the
    JSON's schema, written out as one literal)."""
    started = time.perf_counter()
    report, dataset, split = prepare(args, work)
    config, augment = args.train, args.augment
    train_run = TrainRun(
        dataset, work / "split.csv", work / "model", config, augment, args.checkpoint_dir
    )
    result = train_model(train_run)
    evaluation = evaluate_model(work / "model", dataset, work / "split.csv")
    bare, bare_cl = bare_loops(args, dataset, split)
    ratio = result.train_images_per_s / bare["images_per_s"]
    minutes = result.training_seconds / 60
    device = pick_device(config.device)
    return {
        "benchmark": "accuracy",
        "smoke": bool(args.smoke),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "accuracy": evaluation.accuracy,
        "balanced_accuracy": evaluation.balanced_accuracy,
        "macro_auc": evaluation.macro_auc,
        "per_class_recall": {n: s.recall for n, s in evaluation.per_class.items()},
        "per_class": {n: asdict(s) for n, s in evaluation.per_class.items()},
        "confusion_matrix": evaluation.confusion,
        "test_images": evaluation.num_images,
        "training_minutes": minutes,
        "images_per_s": result.train_images_per_s,
        "bare_torchvision_loop": bare,
        "throughput_ratio": ratio,
        "bare_torchvision_loop_channels_last": bare_cl,
        "throughput_ratio_same_memory_format": result.train_images_per_s / bare_cl["images_per_s"],
        "goals": GOALS,
        "goals_met": {
            "accuracy": evaluation.accuracy >= GOALS["accuracy"],
            "training_minutes": minutes <= GOALS["training_minutes"],
            "throughput_ratio": ratio >= GOALS["throughput_ratio"],
        },
        "data": {
            "source": str(args.data),
            "limit_per_class": args.limit_per_class or None,
            "files_seen": report.files_seen,
            "quarantined": len(report.quarantined),
            "duplicates_removed_by_ingest": len(report.duplicates),
            "label_conflicts": len(report.label_conflicts),
            "fingerprint": report.fingerprint,
            "split_fractions": {"val": args.val_fraction, "test": args.test_fraction},
            "split_seed": args.split_seed,
            "split_sizes": {k: int(v) for k, v in split["split"].value_counts().items()},
            "images_in_two_splits": leaked_groups(split),
        },
        "training": {
            "config": to_dict(config),
            "peak_learning_rate": config.peak_learning_rate,
            "augment": to_dict(augment),
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy,
            "stopped_early": result.stopped_early,
            "history": result.history,
        },
        "environment": {
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "wall_minutes": (time.perf_counter() - started) / 60,
    }


def summary(result: dict[str, Any]) -> str:
    met = result["goals_met"]

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    recall = ", ".join(f"{k} {v:.3f}" for k, v in result["per_class_recall"].items())
    return "\n".join(
        [
            f"test images       {result['test_images']} (duplicate-free, held out)",
            f"accuracy          {result['accuracy']:.4f}  [goal >= 0.987: {mark(met['accuracy'])}]",
            f"balanced accuracy {result['balanced_accuracy']:.4f}",
            f"per-class recall  {recall}",
            f"training          {result['training_minutes']:.1f} min "
            f"[goal <= 60: {mark(met['training_minutes'])}]",
            f"throughput        {result['images_per_s']:.1f} img/s vs bare torchvision loop "
            f"{result['bare_torchvision_loop']['images_per_s']:.1f} img/s = "
            f"{result['throughput_ratio']:.2f}x [goal >= 0.9: {mark(met['throughput_ratio'])}]",
            f"                  vs the bare loop in channels-last "
            f"{result['bare_torchvision_loop_channels_last']['images_per_s']:.1f} img/s = "
            f"{result['throughput_ratio_same_memory_format']:.2f}x (the train step's own overhead)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"skipped: no data at {args.data} (the real MRI set lives in ../shared/data)")
        return 0
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        result = run(args, args.workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
            result = run(args, Path(tmp))
    write_json(result, args.out)
    print(summary(result))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

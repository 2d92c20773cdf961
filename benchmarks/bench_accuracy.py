"""Accuracy benchmark: the real data, a split that holds no copy or neighbour back twice, the
default recipe trained with several seeds.

    python -m benchmarks.bench_accuracy                  # 3 training seeds on one grouped split
    python -m benchmarks.bench_accuracy --kfold 5        # also grouped 5-fold out-of-fold accuracy
    python -m benchmarks.bench_accuracy --kfold 3 --seeds --out results/accuracy_kfold3.json
    python -m benchmarks.bench_accuracy --smoke          # a minute-long check that everything runs
    python -m benchmarks.compare A.json B.json           # two recipes, paired (McNemar)

Ingests ``../shared/data/brain-mri/Training`` with the project's ingest (copies collapse, copies
and neighbouring slices are grouped), splits it with the project's split (stratified, grouped,
leakage-checked against the near-duplicate pairs), trains ``TrainConfig()`` (or the knobs given
as flags) once per training seed with ``components.train.train_model``, scores the untouched
test split with ``components.evaluate``, and measures a bare torchvision training loop on the
same backbone and batch size. ``benchmarks/results/accuracy.json`` holds, per seed, accuracy with
its Wilson 95 % interval and error count, balanced accuracy, per-class recall and errors,
training minutes and images/s; their mean and sd; the per-image answers on the test split (for
paired comparisons); with ``--kfold``, the out-of-fold accuracy over the whole set.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from sklearn.model_selection import StratifiedGroupKFold

from benchmarks.common import (
    RESULTS_DIR,
    SHARED_TRAINING,
    TRAINED_MODEL_DIR,
    bare_loop_throughput,
    limited_copy,
    write_json,
)
from brainmri import CLASS_NAMES
from brainmri.backbones import get_backbone
from brainmri.cpu import cpu_has_bf16, loaded_allocator
from brainmri.dataset import MANIFEST_FILE, load_image_set, read_manifest, read_near_pairs
from brainmri.model import load_bundle, pick_device
from components.config import (
    TEST_FRACTION,
    VAL_FRACTION,
    AugmentConfig,
    TrainConfig,
    add_flags,
    pop_flags,
    to_dict,
)
from components.evaluate import Evaluation, evaluate_rows, score_predictions
from components.ingest import IngestReport, ingest_dataset
from components.split import group_key, leakage, split_manifest
from components.statistics import compare_paired
from components.train import TrainResult, TrainRun, resolve_workers, train_model

GOALS = {"accuracy_mean": 0.99, "training_minutes": 15.0, "throughput_ratio": 0.9}
SMOKE = {"limit_per_class": 20, "bare_steps": 3, "seeds": [0, 1]}
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
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="*",
        default=[0, 1, 2],
        help="training seeds (train.seed); none with --kfold: the k-fold alone",
    )
    parser.add_argument(
        "--kfold", type=int, default=0, help="also K-fold grouped out-of-fold accuracy (0: no)"
    )
    parser.add_argument("--limit-per-class", type=int, default=0, help="0: every image")
    parser.add_argument("--bare-steps", type=int, default=30, help="timed steps of the bare loop")
    parser.add_argument("--workdir", type=Path, help="keep the dataset and models here")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="train nothing: pool these results of one recipe, each run with other seeds, into "
        "--out (the reference is one such file, run once per seed)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny run to check the benchmark works: {SMOKE | SMOKE_TRAINING}; writes "
        "accuracy_smoke.json",
    )
    add_flags(parser, TrainConfig(), "training (TrainConfig)")
    add_flags(parser, AugmentConfig(), "augmentation (AugmentConfig)")
    args = parser.parse_args(argv)
    if not args.seeds and not args.kfold:
        parser.error("--seeds names no seed and --kfold is 0: nothing to measure")
    values = vars(args)
    args.train, args.augment = pop_flags(values, TrainConfig()), pop_flags(values, AugmentConfig())
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.train = replace(args.train, **SMOKE_TRAINING)
    args.out = args.out or RESULTS_DIR / ("accuracy_smoke.json" if args.smoke else "accuracy.json")
    return args


def prepare(args: argparse.Namespace, work: Path) -> tuple[IngestReport, Path, pd.DataFrame]:
    """Ingest (copies collapse, near-duplicates grouped) and split (grouped, leakage-checked) the
    data into ``work``: the ingest report, the dataset folder, the split manifest."""
    source = args.data
    if args.limit_per_class:
        source = limited_copy(args.data, work / "source", args.limit_per_class)
    print(f"ingest {source}", flush=True)
    report = ingest_dataset(str(source), work / "dataset")
    manifest = read_manifest(work / "dataset" / MANIFEST_FILE)
    pairs = read_near_pairs(work / "dataset")
    split = split_manifest(
        manifest, args.val_fraction, args.test_fraction, args.split_seed, near_pairs=pairs
    )
    split.to_csv(work / "split.csv", index=False)
    return report, work / "dataset", split


def prepare_default_split(
    data: Path, work: Path, limit_per_class: int = 0
) -> tuple[IngestReport, Path, pd.DataFrame]:
    """:func:`prepare` with the pipeline's split: its fractions, split seed 0."""
    split_args = argparse.Namespace(
        data=data,
        limit_per_class=limit_per_class,
        val_fraction=VAL_FRACTION,
        test_fraction=TEST_FRACTION,
        split_seed=0,
    )
    return prepare(split_args, work)


def bare_loops(
    args: argparse.Namespace, dataset: Path, split: pd.DataFrame
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The bare torchvision loop's throughput on the same backbone, batch and device: plain
    (fp32), and in the train step's memory format and precision (CPU bf16 autocast when the
    recipe's ``cpu_bf16`` is on and the CPU computes bf16)."""
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
            channels_last=same,
            bf16=same and config.cpu_bf16 and cpu_has_bf16(),
        )
        for same in (False, True)
    )
    return plain, channels_last


def scores(evaluation: Evaluation) -> dict[str, Any]:
    """The figures of one evaluation: accuracy with its interval and errors, per class too."""
    return {
        "accuracy": evaluation.accuracy,
        "accuracy_ci": evaluation.accuracy_ci,
        "errors": evaluation.errors,
        "images": evaluation.num_images,
        "balanced_accuracy": evaluation.balanced_accuracy,
        "balanced_accuracy_ci": evaluation.balanced_accuracy_ci,
        "macro_auc": evaluation.macro_auc,
        "per_class": {
            name: {
                "recall": s.recall,
                "recall_ci": s.recall_ci,
                "errors": s.errors,
                "images": s.support,
            }
            for name, s in evaluation.per_class.items()
        },
        "confusion_matrix": evaluation.confusion,
    }


def train_seed(
    args: argparse.Namespace, work: Path, dataset: Path, split_csv: Path, seed: int
) -> tuple[TrainResult, Evaluation, Evaluation | None]:
    """Train the recipe with training seed ``seed`` and score it on the test split; with
    ``test_time_flip``, score the same model without it too (the lever, paired)."""
    config = replace(args.train, seed=seed)
    out = work / f"model-seed{seed}"
    result = train_model(TrainRun(dataset, split_csv, out, config, args.augment))
    if seed == 0 and not args.smoke:  # what the serving benchmarks serve (bench-load, ...)
        shutil.rmtree(TRAINED_MODEL_DIR, ignore_errors=True)
        shutil.copytree(out, TRAINED_MODEL_DIR)
    frame = pd.read_csv(split_csv)
    test = frame[frame["split"] == "test"]
    bundle = load_bundle(out)
    evaluation = evaluate_rows(bundle, dataset, test, f"test split, seed {seed}")
    unflipped = None
    if bundle.test_time_flip:
        bundle.test_time_flip = False
        unflipped = evaluate_rows(bundle, dataset, test, f"test split, seed {seed}, no flip")
    return result, evaluation, unflipped


def kfold(args: argparse.Namespace, work: Path, dataset: Path, split: pd.DataFrame) -> dict:
    """Grouped, stratified K-fold over every primary image: each fold scored by a model trained
    on the others (a val split carved out of them, grouped too); the out-of-fold accuracy."""
    frame = split[split["set"] == "primary"].reset_index(drop=True)
    groups = group_key(frame).to_numpy()
    folds = StratifiedGroupKFold(args.kfold, shuffle=True, random_state=args.split_seed)
    answers = []
    for number, (rest, held) in enumerate(folds.split(frame, frame["label"], groups)):
        part = frame.loc[rest].drop(columns="split")
        inner = split_manifest(part, args.val_fraction, args.test_fraction, args.split_seed)
        inner.loc[inner["split"] == "test", "split"] = "train"  # train on all but val
        fold = pd.concat([inner, frame.loc[held].assign(split="test")])
        fold.to_csv(work / f"fold{number}.csv", index=False)
        out = work / f"fold{number}-model"
        train_model(TrainRun(dataset, work / f"fold{number}.csv", out, args.train, args.augment))
        held_rows = fold[fold["split"] == "test"]
        evaluation = evaluate_rows(load_bundle(out), dataset, held_rows, f"fold {number}")
        answers.append(evaluation.predictions.assign(fold=number))
        print(f"fold {number}: {evaluation.accuracy:.4f} ({evaluation.errors} errors)", flush=True)
    oof = pd.concat(answers, ignore_index=True)
    index = {name: i for i, name in enumerate(CLASS_NAMES)}
    overall = score_predictions(
        oof["true_label"].map(index).to_numpy(),
        oof[[f"p_{name}" for name in CLASS_NAMES]].to_numpy(),
        CLASS_NAMES,
        list(oof["path"]),
    )
    per_fold = oof.groupby("fold")["correct"].mean()
    return {
        "folds": args.kfold,
        "out_of_fold": scores(overall),
        "fold_accuracy": per_fold.round(5).tolist(),
        "fold_accuracy_sd": float(per_fold.std(ddof=1)) if len(per_fold) > 1 else 0.0,
    }


def mean_sd(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Prepare the data, then train and score every seed against the bare loop, and (with
    ``--kfold``) every fold: the result record."""
    started = time.perf_counter()
    report, dataset, split = prepare(args, work)
    record: dict[str, Any] = {
        "benchmark": "accuracy",
        "smoke": bool(args.smoke),
        "finished_at": "",
    }
    if args.seeds:
        record |= seeds_record(args, work, dataset, split)
    if args.kfold:
        record["kfold"] = kfold(args, work, dataset, split)
    record["data"] = data_record(args, report, dataset, split)
    record["training"] = {"config": to_dict(args.train), "augment": to_dict(args.augment)}
    device = pick_device(args.train.device)
    record["environment"] = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch_threads": torch.get_num_threads(),
        "allocator": loaded_allocator(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    record["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    record["wall_minutes"] = (time.perf_counter() - started) / 60
    return record


def seeds_record(
    args: argparse.Namespace, work: Path, dataset: Path, split: pd.DataFrame
) -> dict[str, Any]:
    """Every training seed trained and scored on the one grouped split, next to the bare loop."""
    seeds = []
    without_flip = {}
    for seed in args.seeds:
        result, evaluation, unflipped = train_seed(args, work, dataset, work / "split.csv", seed)
        seeds.append((seed, result, evaluation))
        if unflipped is not None:
            without_flip[seed] = unflipped
        print(f"seed {seed}: {evaluation.accuracy:.4f} ({evaluation.errors} errors)", flush=True)
    bare, bare_cl = bare_loops(args, dataset, split)
    test_paths = seeds[0][2].predictions["path"].tolist()
    runs = [
        {
            "seed": seed,
            **scores(evaluation),
            "training_minutes": result.training_seconds / 60,
            "images_per_s": result.train_images_per_s,
            "precision": result.precision,
            "selected_weights": result.selected_weights,
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy,
            "stopped_early": result.stopped_early,
            "history": result.history,
        }
        | flip_lever(evaluation, without_flip.get(seed))
        for seed, result, evaluation in seeds
    ]
    answers = {
        "paths": test_paths,
        "correct": {
            str(seed): e.predictions.set_index("path").loc[test_paths, "correct"].tolist()
            for seed, _, e in seeds
        },
    }
    return aggregate(runs, bare, bare_cl, answers)


def aggregate(
    runs: list[dict[str, Any]], bare: dict[str, Any], bare_cl: dict[str, Any], answers: dict
) -> dict[str, Any]:
    """The seeds part of a result from its per-seed ``runs``: their mean ± sd, the bare loops'
    ratios and the goals (the JSON's schema, written out as literals)."""
    images_per_s = statistics.fmean(r["images_per_s"] for r in runs)
    minutes = [r["training_minutes"] for r in runs]
    accuracy = mean_sd([r["accuracy"] for r in runs])
    return {
        "accuracy": accuracy,
        "errors": mean_sd([float(r["errors"]) for r in runs]),
        "balanced_accuracy": mean_sd([r["balanced_accuracy"] for r in runs]),
        "test_images": len(answers["paths"]),
        "training_minutes": mean_sd(minutes),
        "images_per_s": images_per_s,
        "bare_torchvision_loop": bare,
        "throughput_ratio": images_per_s / bare["images_per_s"],
        "bare_torchvision_loop_channels_last": bare_cl,
        "throughput_ratio_same_memory_format": images_per_s / bare_cl["images_per_s"],
        "seeds": runs,
        "test_answers": answers,
        "goals": GOALS,
        "goals_met": {
            "accuracy_mean": accuracy["mean"] >= GOALS["accuracy_mean"],
            "training_minutes": max(minutes) <= GOALS["training_minutes"],
            # against the bare loop in the step's own memory format and precision
            "throughput_ratio": images_per_s / bare_cl["images_per_s"] >= GOALS["throughput_ratio"],
        },
    }


class NotOneRecipe(ValueError):
    """Results that cannot pool: another recipe, split or machine set-up, or a repeated seed."""


def merged(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Results of one recipe trained with different seeds (one ``make bench-accuracy`` run each)
    as the one result of all its seeds; the bare loops' images/s averaged over the runs."""
    first = results[0]

    def same(*keys: str) -> Any:
        def value(result: dict[str, Any]) -> Any:
            for key in keys:
                result = result[key]
            return result

        if any(value(r) != value(first) for r in results[1:]):
            raise NotOneRecipe(f"the results differ in {'.'.join(keys)}: not one recipe")
        return value(first)

    for keys in (("data", "fingerprint"), ("data", "split_sizes"), ("test_answers", "paths")):
        same(*keys)
    same("training", "augment")
    same("environment")
    configs = [{k: v for k, v in r["training"]["config"].items() if k != "seed"} for r in results]
    if any(config != configs[0] for config in configs):
        raise NotOneRecipe("the results differ in training.config beyond the seed: not one recipe")
    runs = [run for result in results for run in result["seeds"]]
    if len({run["seed"] for run in runs}) != len(runs):
        raise NotOneRecipe(f"a seed repeats: {sorted(run['seed'] for run in runs)}")
    bare = {
        name: first[name]
        | {"images_per_s": statistics.fmean(r[name]["images_per_s"] for r in results)}
        for name in ("bare_torchvision_loop", "bare_torchvision_loop_channels_last")
    }
    answers = {
        "paths": first["test_answers"]["paths"],
        "correct": {k: v for r in results for k, v in r["test_answers"]["correct"].items()},
    }
    return (
        {k: first[k] for k in ("benchmark", "smoke")}
        | {"finished_at": max(r["finished_at"] for r in results)}
        | aggregate(runs, *bare.values(), answers)
        | {k: first[k] for k in ("data", "training", "environment")}
        | {"wall_minutes": sum(r["wall_minutes"] for r in results)}
    )


def flip_lever(flipped: Evaluation, unflipped: Evaluation | None) -> dict[str, Any]:
    """The same model scored without its test-time flip, and the two paired (McNemar); empty
    for a model without one."""
    if unflipped is None:
        return {}
    answers = [e.predictions.set_index("path")["correct"] for e in (flipped, unflipped)]
    paired = compare_paired(answers[0], answers[1].loc[answers[0].index])
    return {
        "without_test_time_flip": scores(unflipped),
        "test_time_flip_paired": {
            "only_with_flip_right": paired.only_first_right,
            "only_without_flip_right": paired.only_second_right,
            "mcnemar_p": paired.mcnemar_p,
        },
    }


def data_record(
    args: argparse.Namespace, report: IngestReport, dataset: Path, split: pd.DataFrame
) -> dict[str, Any]:
    """What was trained on: the ingest's counts, the split and its leakage."""
    return {
        "source": str(args.data),
        "limit_per_class": args.limit_per_class or None,
        "files_seen": report.files_seen,
        "quarantined": len(report.quarantined),
        "duplicates_removed_by_ingest": len(report.duplicates),
        "label_conflicts": len(report.label_conflicts),
        "near_duplicates": {k: v for k, v in report.near_duplicates.items() if k != "samples"},
        "fingerprint": report.fingerprint,
        "split_fractions": {"val": args.val_fraction, "test": args.test_fraction},
        "split_seed": args.split_seed,
        "split_sizes": {k: int(v) for k, v in split["split"].value_counts().items()},
        "leakage": leakage(split, read_near_pairs(dataset)),
    }


def summary(result: dict[str, Any]) -> str:
    """The figures a reader wants, one line each."""
    lines = [f"leakage           {result['data']['leakage']}"]
    if "seeds" in result:
        lines += seeds_summary(result)
    if "kfold" in result:
        oof = result["kfold"]["out_of_fold"]
        lines.append(
            f"{result['kfold']['folds']}-fold OOF        {oof['accuracy']:.4f} "
            f"[{oof['accuracy_ci'][0]:.4f}, {oof['accuracy_ci'][1]:.4f}] {oof['errors']} errors "
            f"of {oof['images']}; per fold {result['kfold']['fold_accuracy']}"
        )
    return "\n".join(lines)


def seeds_summary(result: dict[str, Any]) -> list[str]:
    met = result["goals_met"]

    def mark(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    lines = [
        f"test images       {result['test_images']} (grouped: no copy or neighbour of a test "
        "image trained on)"
    ]
    for run in result["seeds"]:
        low, high = run["accuracy_ci"]
        recall = ", ".join(
            f"{k} {v['recall']:.3f} ({v['errors']})" for k, v in run["per_class"].items()
        )
        lines.append(
            f"seed {run['seed']}            {run['accuracy']:.4f} [{low:.4f}, {high:.4f}] "
            f"{run['errors']} errors; recall (errors) {recall}; {run['training_minutes']:.1f} min"
        )
    accuracy = result["accuracy"]
    return lines + [
        f"accuracy          {accuracy['mean']:.4f} ± {accuracy['sd']:.4f} over "
        f"{len(result['seeds'])} seeds [goal >= {GOALS['accuracy_mean']}: "
        f"{mark(met['accuracy_mean'])}]",
        f"training          {result['training_minutes']['mean']:.1f} min "
        f"[goal <= {GOALS['training_minutes']}: {mark(met['training_minutes'])}]",
        f"throughput        {result['images_per_s']:.1f} img/s = {result['throughput_ratio']:.2f}x "
        f"the bare torchvision loop ({result['throughput_ratio_same_memory_format']:.2f}x in "
        f"its memory format and precision) [goal >= 0.9: {mark(met['throughput_ratio'])}]",
    ]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge_files(args.merge, args.out)
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


def merge_files(paths: list[Path], out: Path) -> int:
    """``--merge``: the results in ``paths`` pooled into ``out``; 2 when they cannot pool."""
    try:
        result = merged([json.loads(path.read_text()) for path in paths])
    except (OSError, ValueError, KeyError) as err:
        print(f"error: cannot merge {', '.join(map(str, paths))}: {err}", file=sys.stderr)
        return 2
    write_json(result, out)
    print(summary(result))
    print(f"wrote {out} from {len(paths)} results")
    return 0


if __name__ == "__main__":
    sys.exit(main())

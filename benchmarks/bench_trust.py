"""``make bench-trust``: how far the trained model's answers can be trusted, on 2 CPU cores.

On the real data (``../shared/data/brain-mri/Training``, ingested and split exactly as
``make bench-accuracy`` does: grouped, no copy or neighbour across the split), with the seed-0
model that benchmark keeps (``local_outputs/bench/trained-model``, or ``--model-dir``):

1. the trust of :mod:`brainmri.trust` is fitted as training fits it (``fit_bundle_trust``: the
   temperature, the conformal sets and the confidence threshold on the validation split, the OOD
   detectors on the training features), never on the test split;
2. the held-out test split, a deliberately shifted copy of it (:mod:`brainmri.shift`: contrast
   and gamma, blur, noise, JPEG, rotation, a crop that moves the brain) and the generated
   non-MRI set (:mod:`brainmri.non_mri`, seed 0; training compares the detectors on seed 1) are
   scored: ECE before/after, NLL, Brier, coverage and set size, the share of right and of wrong
   answers flagged, OOD AUROC and FPR95TPR for both detectors;
3. the predictor container is started as a cluster starts it and ``:explain`` (and, for
   comparison, ``:predict``) is timed one image at a time.

On the demo data (made as ``make run`` makes it, with the lesion masks the generator drew), the
demo model is trained as ``make run`` trains it and its activation maps are scored where the truth
is known: the pointing game (the hottest point in the lesion; strictly, and within Zhang et al.'s
15 px of a 224 px image, 6.7 % of the side) and the IoU of the hottest box with the lesion's box,
on the demo test split and on fresh demo images.

    python -m benchmarks.bench_trust [--model-dir DIR] [--smoke]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from benchmarks.bench_accuracy import prepare_default_split
from benchmarks.bench_load import check_model, container_args, unloaded_latency
from benchmarks.common import RESULTS_DIR, SHARED_TRAINING, TRAINED_MODEL_DIR, write_json
from brainmri import CLASS_NAMES
from brainmri.dataset import MANIFEST_FILE, ImageSet, load_image_set, read_manifest
from brainmri.demo_data import generate_demo_dataset, lesion_box, read_lesion_mask
from brainmri.model import ModelBundle
from brainmri.non_mri import non_mri_batch
from brainmri.shift import SHIFTS, shifted_copy
from brainmri.trust import (
    OOD_METHODS,
    Outputs,
    fit_ood,
    heatmaps,
    hottest_box,
    ood_metrics,
)
from components.config import (
    DEMO_TRAINING,
    DEMO_VAL_FRACTION,
    TEST_FRACTION,
    TrainConfig,
)
from components.evaluate import Evaluation, evaluate_bundle
from components.ingest import ingest_dataset
from components.split import split_manifest
from components.train import TrainRun, fit_bundle_trust, train_model
from components.trust_scores import POINTING_TOLERANCE, box_iou, pointing_distance
from serving.process import serve_in_subprocess

NON_MRI_SEED = 0  # the benchmark's non-MRI set (training's probe uses PROBE_SEED)
NON_MRI_PER_KIND = 25
FRESH_DEMO_PER_CLASS = 100
GOALS = {
    "ece_max": 0.02,
    "coverage_within": 0.015,
    "wrong_flagged_min": 0.60,
    "right_flagged_max": 0.02,
    "ood_auroc_min": 0.99,
    "pointing_min": 0.90,
    "explain_p99_ms_max": 1000.0,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_trust",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--data", type=Path, default=SHARED_TRAINING, help="<class>/<image> tree")
    parser.add_argument("--model-dir", type=Path, default=TRAINED_MODEL_DIR)
    parser.add_argument("--limit-per-class", type=int, default=0, help="0 = every image")
    parser.add_argument("--explain-requests", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "trust.json")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a quick check on a few images per class (any model; figures not written)",
    )
    args = parser.parse_args(argv)
    if args.smoke:
        args.limit_per_class = args.limit_per_class or 40
        args.explain_requests = 10
    return args


def split_images(args: argparse.Namespace, work: Path, bundle: ModelBundle) -> dict[str, ImageSet]:
    """The real data ingested and split as bench-accuracy does; each split's decoded images."""
    _, dataset, split = prepare_default_split(args.data, work, args.limit_per_class)
    return {
        name: load_image_set(
            dataset, split[split["split"] == name], list(CLASS_NAMES), bundle.preprocess, desc=name
        )
        for name in ("train", "val", "test")
    }


def flag_frontier(evaluation: Evaluation, rates: tuple[float, ...] = (0.02, 0.05, 0.1)) -> dict:
    """What a confidence threshold alone could do: the share of wrong answers below the
    threshold that flags each share of right answers (read off this set, to show the trade-off;
    the served threshold is fitted on validation)."""
    frame = evaluation.predictions
    confidence = frame[[f"p_{name}" for name in evaluation.class_names]].max(axis=1).to_numpy()
    right = frame["correct"].to_numpy(bool)
    if right.all() or not right.any():
        return {}
    return {
        f"{rate:.0%} of right answers": float(
            (confidence[~right] < np.quantile(confidence[right], rate)).mean()
        )
        for rate in rates
    }


def summary(evaluation: Evaluation) -> dict[str, Any]:
    """An evaluation's accuracy and trust figures, as JSON."""
    trust = evaluation.trust
    return {
        "wrong_flagged_by_confidence_alone_at": flag_frontier(evaluation),
        "images": evaluation.num_images,
        "accuracy": evaluation.accuracy,
        "errors": evaluation.errors,
        "accuracy_ci": evaluation.accuracy_ci,
        "ece_before": trust.before.ece,
        "ece_after": trust.after.ece,
        "nll_before": trust.before.nll,
        "nll_after": trust.after.nll,
        "brier_before": trust.before.brier,
        "brier_after": trust.after.brier,
        "overall": vars(trust.overall),
        "per_class": {name: vars(rates) for name, rates in trust.per_class.items()},
    }


def ood_figures(
    train: Outputs,
    labels: torch.Tensor,
    val: Outputs,
    inside: dict[str, Outputs],
    outside: Outputs,
    kinds: list[str],
    false_rejection_rate: float,
) -> dict[str, Any]:
    """Both detectors (fitted as training fits them) on the non-MRI set against each in-
    distribution set: pytorch-ood's metrics, and the shares rejected at the fitted threshold."""
    figures: dict[str, Any] = {}
    for method in OOD_METHODS:
        detector = fit_ood(method, train, labels, val, false_rejection_rate)
        outside_scores = detector.scores(outside)
        per_kind = {
            kind: float(
                (outside_scores[[k == kind for k in kinds]] > detector.threshold).float().mean()
            )
            for kind in dict.fromkeys(kinds)
        }
        figures[method] = {
            "threshold": detector.threshold,
            "non_mri_rejected": float((outside_scores > detector.threshold).float().mean()),
            "non_mri_rejected_per_kind": per_kind,
            **{
                name: {
                    **ood_metrics(detector, outputs, outside),
                    "slices_rejected": float(
                        (detector.scores(outputs) > detector.threshold).float().mean()
                    ),
                }
                for name, outputs in inside.items()
            },
        }
    return figures


def explain_latency(bundle: ModelBundle, files: list[bytes], requests: int) -> dict[str, Any]:
    """``:explain`` and ``:predict`` timed one image at a time against the predictor container
    (its cluster arguments), serving ``bundle``."""
    with tempfile.TemporaryDirectory(prefix="bench-trust-") as tmp:
        model_dir = bundle.save(Path(tmp) / "model")
        server_args, _ = container_args(model_dir)
        with serve_in_subprocess(server_args, Path(tmp) / "server.log") as server:
            explain = unloaded_latency(server.port, files, requests, verb="explain")
            predict = unloaded_latency(server.port, files, requests, verb="predict")
    return {"explain": explain, "predict": predict}


def real_data_figures(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    bundle = check_model(args.model_dir, allow_stand_in=args.smoke)
    sets = split_images(args, work, bundle)
    outputs = {
        name: bundle.forward_images(data.images, desc=f"forward {name}")
        for name, data in sets.items()
    }
    config = TrainConfig()
    bundle.trust = fit_bundle_trust(  # as training fits it, on outputs computed once here
        bundle, outputs["train"], sets["train"].labels, outputs["val"], sets["val"].labels, config
    )
    test = sets["test"]
    shifted_images, shifts = shifted_copy(test.images, seed=0)
    held_out = evaluate_bundle(bundle, test.images, test.labels, test.paths)
    shifted = evaluate_bundle(bundle, shifted_images, test.labels, test.paths)
    per_shift = {
        shift: float(shifted.predictions["correct"][[s == shift for s in shifts]].mean())
        for shift in SHIFTS
    }
    non_mri, kinds = non_mri_batch(bundle.preprocess, NON_MRI_PER_KIND, NON_MRI_SEED)
    inside = {"test": outputs["test"], "shifted": bundle.forward_images(shifted_images)}
    ood = ood_figures(
        outputs["train"],
        sets["train"].labels,
        outputs["val"],
        inside,
        bundle.forward_images(non_mri, desc="forward non-MRI"),
        kinds,
        config.false_rejection_rate,
    )
    dataset = work / "dataset"
    files = [(dataset / path).read_bytes() for path in test.paths[: max(args.explain_requests, 5)]]
    return {
        "model": {
            "backbone": bundle.backbone,
            "image_size": bundle.preprocess.image_size,
            "test_time_flip": bundle.test_time_flip,
            "seed": bundle.metadata.get("train_config", {}).get("seed"),
        },
        "trust": bundle.trust.to_dict(),
        "split_sizes": {name: len(data) for name, data in sets.items()},
        "held_out": summary(held_out),
        "shifted": {**summary(shifted), "accuracy_per_shift": per_shift},
        "non_mri_images": len(kinds),
        "ood": ood,
        "latency": explain_latency(bundle, files, args.explain_requests),
    }


def pointing(
    bundle: ModelBundle, data: ImageSet, masks: list[np.ndarray], size: int
) -> dict[str, Any]:
    """The pointing game and box IoU of ``bundle``'s activation maps (of its predicted class,
    at the images' ``size``) against the lesion masks (images without a lesion are left out)."""
    outputs = bundle.forward_images(data.images, maps=True)
    predicted = outputs.probabilities(bundle.trust.temperature).argmax(dim=1)
    maps = heatmaps(outputs.maps, bundle.head_weight, predicted, (size, size))
    tolerance = POINTING_TOLERANCE * size
    rows = []
    for heat, mask, label in zip(maps, masks, data.labels.tolist(), strict=True):
        if not mask.any():
            continue
        distance = pointing_distance(heat, mask)
        rows.append(
            {
                "class": CLASS_NAMES[label],
                "strict": distance == 0,
                "tolerant": distance <= tolerance,
                "iou": box_iou(hottest_box(heat), lesion_box(mask)),
            }
        )
    frame = pd.DataFrame(rows)
    per_class = frame.groupby("class")[["strict", "tolerant", "iou"]].mean()
    return {
        "images": len(frame),
        "pointing_strict": float(frame["strict"].mean()),
        "pointing_tolerant": float(frame["tolerant"].mean()),
        "box_iou": float(frame["iou"].mean()),
        "tolerance_px": tolerance,
        "accuracy": float((predicted == data.labels).float().mean()),
        "per_class": per_class.to_dict(orient="index"),
    }


def demo_figures(work: Path) -> dict[str, Any]:
    """The demo model trained as ``make run`` trains it; its maps scored on the demo test split
    and on fresh demo images, against the masks the generator drew."""
    size = 128
    demo, masks = work / "demo", work / "demo-masks"
    generate_demo_dataset(demo, per_class=60, size=size, seed=0, mask_dir=masks)
    ingest_dataset(str(demo), work / "demo-dataset", progress=False)
    manifest = read_manifest(work / "demo-dataset" / MANIFEST_FILE)
    split = split_manifest(manifest, DEMO_VAL_FRACTION, TEST_FRACTION, 0)  # make run's
    split.to_csv(work / "demo-split.csv", index=False)
    run = TrainRun(
        str(work / "demo-dataset"),
        str(work / "demo-split.csv"),
        str(work / "demo-model"),
        DEMO_TRAINING,
    )
    started = time.perf_counter()
    train_model(run, progress=False)
    train_seconds = time.perf_counter() - started
    bundle = ModelBundle.load(work / "demo-model")
    rows = split[split["split"] == "test"]
    test = load_image_set(
        work / "demo-dataset", rows, list(CLASS_NAMES), bundle.preprocess, desc=""
    )
    test_masks = [read_lesion_mask(masks, "/".join(Path(p).parts[-2:])) for p in test.paths]
    fresh_dir, fresh_masks = work / "fresh", work / "fresh-masks"
    generate_demo_dataset(fresh_dir, FRESH_DEMO_PER_CLASS, size, seed=1, mask_dir=fresh_masks)
    fresh_rows = pd.DataFrame(
        {"path": [str(p.relative_to(fresh_dir)) for p in sorted(fresh_dir.rglob("*.png"))]}
    ).assign(label=lambda f: f["path"].str.split("/").str[0])
    fresh = load_image_set(fresh_dir, fresh_rows, list(CLASS_NAMES), bundle.preprocess, desc="")
    fresh_mask_list = [read_lesion_mask(fresh_masks, p) for p in fresh.paths]
    return {
        "model": f"{DEMO_TRAINING.backbone} at {DEMO_TRAINING.image_size} px, "
        f"{DEMO_TRAINING.epochs} epochs (make run's), trained in {train_seconds:.1f} s",
        "demo_test_split": pointing(bundle, test, test_masks, size),
        "fresh_demo_images": pointing(bundle, fresh, fresh_mask_list, size),
    }


def goals(result: dict[str, Any]) -> dict[str, bool]:
    held_out, demo = result["real"]["held_out"], result["demo"]["demo_test_split"]
    chosen = result["real"]["trust"]["ood"]["method"]
    target = result["real"]["trust"]["coverage"]
    overall = held_out["overall"]
    return {
        "ece_at_most_2_percent": held_out["ece_after"] <= GOALS["ece_max"],
        "coverage_within_1.5_points": abs(overall["coverage"] - target) <= GOALS["coverage_within"],
        "wrong_flagged_at_least_60_percent": (overall["wrong_flagged"] or 0)
        >= GOALS["wrong_flagged_min"],
        "right_flagged_at_most_2_percent": (overall["right_flagged"] or 0)
        <= GOALS["right_flagged_max"],
        "ood_auroc_at_least_0.99": result["real"]["ood"][chosen]["test"]["AUROC"]
        >= GOALS["ood_auroc_min"],
        "pointing_at_least_90_percent": demo["pointing_tolerant"] >= GOALS["pointing_min"],
        "explain_p99_at_most_1s": result["real"]["latency"]["explain"]["p99_ms"]
        <= GOALS["explain_p99_ms_max"],
    }


def print_table(result: dict[str, Any]) -> None:
    real = result["real"]
    print(f"\nmodel {real['model']}, trust fitted on val: {real['trust']}")
    for name in ("held_out", "shifted"):
        part = real[name]
        o = part["overall"]
        print(
            f"{name:9s} acc {part['accuracy']:.2%} ({part['errors']} errors of {part['images']}) "
            f"ECE {part['ece_before']:.2%} -> {part['ece_after']:.2%}, NLL "
            f"{part['nll_before']:.3f} -> {part['nll_after']:.3f}; coverage {o['coverage']:.2%} "
            f"(set size {o['mean_set_size']:.2f}, empty {o['empty_sets']:.1%}); flagged: right "
            f"{o['right_flagged'] or 0:.1%}, wrong {o['wrong_flagged'] or 0:.1%} of {o['wrong']}"
        )
        print(
            "          share of the wrong a confidence threshold alone flags at: "
            f"{part['wrong_flagged_by_confidence_alone_at']}"
        )
    for method, figures in real["ood"].items():
        print(
            f"OOD {method:11s} AUROC test {figures['test']['AUROC']:.4f} shifted "
            f"{figures['shifted']['AUROC']:.4f}; FPR95TPR test "
            f"{figures['test']['FPR95TPR']:.3f}; non-MRI rejected "
            f"{figures['non_mri_rejected']:.1%}, slices rejected test "
            f"{figures['test']['slices_rejected']:.1%} shifted "
            f"{figures['shifted']['slices_rejected']:.1%}"
        )
    latency = real["latency"]
    print(
        f"explain p50 {latency['explain']['p50_ms']:.0f} ms p99 {latency['explain']['p99_ms']:.0f}"
        f" ms (predict p50 {latency['predict']['p50_ms']:.0f} ms p99 "
        f"{latency['predict']['p99_ms']:.0f} ms)"
    )
    for name, figures in result["demo"].items():
        if isinstance(figures, dict):
            print(
                f"demo {name}: pointing {figures['pointing_tolerant']:.1%} (strict "
                f"{figures['pointing_strict']:.1%}), box IoU {figures['box_iou']:.2f}, "
                f"{figures['images']} lesions, accuracy {figures['accuracy']:.1%}"
            )
    print(f"goals: {result['goals_met']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-trust-") as tmp:
        work = Path(tmp)
        result: dict[str, Any] = {
            "benchmark": "trust",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
            "load_average_before": load_before,
            "real": real_data_figures(args, work),
            "demo": demo_figures(work),
        }
    result["goals"] = GOALS
    result["goals_met"] = goals(result)
    print_table(result)
    if args.smoke:
        print("smoke run: figures not written")
        return 0
    write_json(result, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

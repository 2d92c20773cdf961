"""Evaluate: score a model bundle on held-out images with scikit-learn metrics.

Accuracy, balanced accuracy, per-class precision/recall/F1, one-vs-rest ROC curves and AUCs
(macro average), the confusion matrix and the most confidently misclassified images (the
Markdown report of them is :mod:`components.report`'s). Runs on a split of the pipeline's dataset
(:func:`evaluate_model`) or on any class-per-folder tree (:func:`evaluate_folder`), also from the
command line::

    python -m components.evaluate --model <folder or s3://bucket/prefix> --data <class folders>
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from brainmri.class_folders import LabelledFile, list_labelled_files
from brainmri.dataset import load_image_set
from brainmri.images import ImageDecodeError, decode_image
from brainmri.model import ModelBundle, load_bundle
from brainmri.storage import StorageError
from components.report import render_report
from components.split import NOVEL, load_split
from components.statistics import balanced_accuracy_interval, wilson_interval
from components.trust_scores import ExplainedImage, TrustScores, explained_images, trust_scores

WORST_SHOWN = 8  # misclassified images shown in the report
THUMBNAIL_PX = 96
MAX_ROC_POINTS = 200


@dataclass(frozen=True)
class ClassScores:
    precision: float
    recall: float  # the class's accuracy
    f1: float
    support: int
    auc: float | None  # one-vs-rest; None when the class is absent (or alone) in the data
    errors: int = 0  # images of the class given another label
    recall_ci: tuple[float, float] | None = None  # Wilson 95 %


@dataclass(frozen=True)
class RocCurve:
    """One-vs-rest ROC points; thresholds are probabilities (the first is 1.0, not +inf)."""

    fpr: list[float]
    tpr: list[float]
    thresholds: list[float]


@dataclass(frozen=True)
class Misclassified:
    path: str
    true_label: str
    predicted_label: str
    confidence: float  # the probability given to the wrong prediction
    thumbnail_png: str = field(default="", repr=False)  # base64 PNG, for the report


@dataclass
class Evaluation:
    """Scores of one model on one set of images."""

    accuracy: float
    balanced_accuracy: float
    confusion: list[list[int]]
    class_names: list[str]
    num_images: int
    errors: int = 0
    accuracy_ci: tuple[float, float] | None = None  # Wilson 95 %
    balanced_accuracy_ci: tuple[float, float] | None = None  # class-stratified bootstrap 95 %
    per_class: dict[str, ClassScores] = field(default_factory=dict)
    macro_auc: float | None = None
    roc: dict[str, RocCurve] = field(default_factory=dict)  # per class, and "micro"
    worst: list[Misclassified] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)  # backbone, preprocess, metadata
    data: str = ""  # what was evaluated: "<split csv> [test]" or a folder
    predictions: pd.DataFrame | None = field(default=None, repr=False)  # one row per image
    trust: TrustScores | None = None  # calibration, sets and flags (from a bundle's answers)
    explained: list[ExplainedImage] = field(default_factory=list)  # with their heatmaps

    def metrics(self) -> dict[str, Any]:
        """The scores as plain JSON-able data (no curves, no images)."""
        return {
            "accuracy": self.accuracy,
            "accuracy_ci": self.accuracy_ci,
            "errors": self.errors,
            "balanced_accuracy": self.balanced_accuracy,
            "balanced_accuracy_ci": self.balanced_accuracy_ci,
            "macro_auc": self.macro_auc,
            "num_images": self.num_images,
            "class_names": self.class_names,
            "per_class": {name: asdict(s) for name, s in self.per_class.items()},
            "confusion_matrix": self.confusion,
            "worst_misclassified": [
                {k: v for k, v in asdict(m).items() if k != "thumbnail_png"} for m in self.worst
            ],
            "trust": self.trust.to_dict() if self.trust else None,
        }

    def scalar_metrics(self) -> dict[str, float]:
        """Flat name -> number, as logged to a KFP ``Metrics`` artifact."""
        scalars = {
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "test_images": float(self.num_images),
            "errors": float(self.errors),
            **_interval("accuracy", self.accuracy_ci),
            **_interval("balanced_accuracy", self.balanced_accuracy_ci),
        }
        if self.macro_auc is not None:
            scalars["macro_auc"] = self.macro_auc
        if self.trust is not None:
            scalars.update(self.trust.scalar_metrics())
        for name, s in self.per_class.items():
            scalars.update(
                {f"{name}_precision": s.precision, f"{name}_recall": s.recall, f"{name}_f1": s.f1}
            )
            scalars.update(
                {f"{name}_errors": float(s.errors), **_interval(f"{name}_recall", s.recall_ci)}
            )
        return scalars

    def subset(self, mask: np.ndarray, data: str) -> Evaluation:
        """Every score again, on the images where ``mask`` is true (same model)."""
        rows = self.predictions[np.asarray(mask, bool)]
        index = {name: i for i, name in enumerate(self.class_names)}
        evaluation = score_predictions(
            rows["true_label"].map(index).to_numpy(),
            rows[[f"p_{name}" for name in self.class_names]].to_numpy(),
            self.class_names,
            list(rows["path"]),
        )
        evaluation.model, evaluation.data = self.model, data
        return evaluation


def _interval(name: str, interval: tuple[float, float] | None) -> dict[str, float]:
    return (
        {} if interval is None else {f"{name}_ci_low": interval[0], f"{name}_ci_high": interval[1]}
    )


def predict_proba(bundle: ModelBundle, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Calibrated class probabilities (N, C) for cached uint8 images, in batches."""
    outputs = bundle.forward_images(images, batch_size)
    return outputs.probabilities(bundle.trust.temperature)


def _thin(curve: RocCurve, limit: int = MAX_ROC_POINTS) -> RocCurve:
    if len(curve.fpr) <= limit:
        return curve
    keep = np.unique(np.linspace(0, len(curve.fpr) - 1, limit).round().astype(int))
    return RocCurve(*([values[i] for i in keep] for values in asdict(curve).values()))


def _roc(truth: np.ndarray, scores: np.ndarray) -> RocCurve | None:
    if truth.all() or not truth.any():  # ROC needs positives and negatives
        return None
    fpr, tpr, thresholds = roc_curve(truth, scores)
    thresholds = np.minimum(thresholds, 1.0)  # the first is +inf: not JSON, not a probability
    return _thin(RocCurve(fpr.tolist(), tpr.tolist(), thresholds.tolist()))


def _thumbnail(image: torch.Tensor) -> str:
    """A base64 PNG of a uint8 (3, H, W) image, grey when its channels are equal."""
    array = image.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if (array == array[:, :, :1]).all() else array)
    picture.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode()


def score_predictions(
    truth: np.ndarray,
    proba: np.ndarray,
    class_names: Sequence[str],
    paths: Sequence[str] = (),
    images: torch.Tensor | None = None,
    worst: int = WORST_SHOWN,
) -> Evaluation:
    """Every score of predicted probabilities ``proba`` (N, C) against labels ``truth`` (N,)."""
    class_names = list(class_names)
    labels = list(range(len(class_names)))
    predicted = proba.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, labels=labels, zero_division=0
    )
    roc: dict[str, RocCurve] = {}
    aucs: dict[str, float] = {}
    for k, name in enumerate(class_names):
        curve = _roc(truth == k, proba[:, k])
        if curve is not None:
            roc[name] = curve
            aucs[name] = float(roc_auc_score(truth == k, proba[:, k]))
    onehot = np.eye(len(class_names), dtype=bool)[truth]
    micro = _roc(onehot.ravel(), proba.ravel())
    if micro is not None:
        roc["micro"] = micro
    wrong = np.flatnonzero(predicted != truth)
    wrong = wrong[np.argsort(-proba[wrong, predicted[wrong]], kind="stable")][:worst]
    correct = predicted == truth
    return Evaluation(
        accuracy=float(accuracy_score(truth, predicted)),
        balanced_accuracy=float(balanced_accuracy_score(truth, predicted)),
        confusion=confusion_matrix(truth, predicted, labels=labels).tolist(),
        class_names=class_names,
        num_images=len(truth),
        errors=int((~correct).sum()),
        accuracy_ci=wilson_interval(int(correct.sum()), len(truth)),
        balanced_accuracy_ci=balanced_accuracy_interval(truth, predicted),
        per_class={
            name: ClassScores(
                float(precision[k]),
                float(recall[k]),
                float(f1[k]),
                int(support[k]),
                aucs.get(name),
                errors=int(((truth == k) & ~correct).sum()),
                recall_ci=wilson_interval(int(((truth == k) & correct).sum()), int(support[k])),
            )
            for k, name in enumerate(class_names)
        },
        predictions=pd.DataFrame(
            {
                "path": list(paths) if len(paths) else [str(i) for i in range(len(truth))],
                "true_label": [class_names[t] for t in truth],
                "predicted_label": [class_names[p] for p in predicted],
                "correct": correct,
                **{f"p_{name}": proba[:, k] for k, name in enumerate(class_names)},
            }
        ),
        macro_auc=float(np.mean(list(aucs.values()))) if aucs else None,
        roc=roc,
        worst=[
            Misclassified(
                path=paths[i] if len(paths) else str(i),
                true_label=class_names[truth[i]],
                predicted_label=class_names[predicted[i]],
                confidence=float(proba[i, predicted[i]]),
                thumbnail_png=_thumbnail(images[i]) if images is not None else "",
            )
            for i in wrong
        ],
    )


def _model_info(bundle: ModelBundle) -> dict[str, Any]:
    return {
        "backbone": bundle.backbone,
        "preprocess": bundle.preprocess.to_dict(),
        "metadata": bundle.metadata,
    }


def evaluate_bundle(
    bundle: ModelBundle, images: torch.Tensor, labels: torch.Tensor, paths: Sequence[str]
) -> Evaluation:
    """Score ``bundle`` on cached uint8 images (resized with its own preprocessing): every score
    of its calibrated probabilities, its trust figures, and its heatmaps over the worst mistakes
    and a few right answers per class."""
    outputs = bundle.forward_images(images, desc="evaluate")
    assessment = bundle.trust.assess(outputs)
    proba, truth = assessment.probabilities.numpy(), labels.numpy()
    evaluation = score_predictions(truth, proba, bundle.class_names, paths, images)
    evaluation.model = _model_info(bundle)
    if not len(truth):
        return evaluation
    trust = bundle.trust
    evaluation.trust = trust_scores(
        truth,
        outputs.probabilities().numpy(),
        assessment,
        bundle.class_names,
        trust.temperature,
        trust.coverage if trust.set_quantile is not None else None,  # None: no sets fitted
    )
    evaluation.predictions = evaluation.predictions.assign(
        prediction_set=[",".join(names) for names in assessment.set_members(bundle.class_names)],
        uncertain=assessment.uncertain.numpy(),
        ood_score=assessment.ood_scores.numpy(),
        not_brain_mri=assessment.not_brain_mri.numpy(),
    )
    row_of = {path: i for i, path in enumerate(evaluation.predictions["path"])}
    worst = [row_of[m.path] for m in evaluation.worst]
    shown_paths = list(evaluation.predictions["path"])
    evaluation.explained = explained_images(bundle, images, truth, proba, shown_paths, worst)
    return evaluation


def evaluate_split(
    bundle: ModelBundle, dataset_dir: Path, split_csv: Path, split_name: str = "test"
) -> Evaluation:
    """Every score of a loaded ``bundle`` on one split of the pipeline's dataset."""
    frame = load_split(split_csv)
    rows = frame[frame["split"] == split_name]
    if rows.empty:
        raise ValueError(f"{split_csv}: split '{split_name}' is empty; nothing to evaluate")
    return evaluate_rows(bundle, dataset_dir, rows, f"{Path(split_csv).name} [{split_name}]")


def evaluate_rows(
    bundle: ModelBundle, dataset_dir: Path, rows: pd.DataFrame, data: str
) -> Evaluation:
    """Every score of ``bundle`` on the manifest ``rows`` (paths under ``dataset_dir``)."""
    images = load_image_set(
        dataset_dir, rows, bundle.class_names, bundle.preprocess, desc=f"decode {data}"
    )
    evaluation = evaluate_bundle(bundle, images.images, images.labels, images.paths)
    evaluation.data = data
    return evaluation


def external_parts(evaluation: Evaluation, frame: pd.DataFrame) -> dict[str, Evaluation]:
    """An external test set's scores apart on its ``novel`` images and on those with a
    ``near_copy`` (a copy or neighbour) in train/val, as the split marked them; empty when the
    split has no marks (a dataset ingested without near-duplicate pairs)."""
    if "near_training" not in frame:
        return {}
    marks = frame.set_index("path")["near_training"].reindex(evaluation.predictions["path"])
    novel = (marks == NOVEL).to_numpy()
    parts = {"novel": novel, "near_copy": ~novel}
    return {
        name: evaluation.subset(mask, f"{evaluation.data}, {name}") for name, mask in parts.items()
    }


def evaluate_model(
    model_dir: Path, dataset_dir: Path, split_csv: Path, split_name: str = "test"
) -> Evaluation:
    """Every score of the bundle in ``model_dir`` on one split of the pipeline's dataset."""
    return evaluate_split(load_bundle(model_dir), dataset_dir, split_csv, split_name)


@dataclass
class FolderImages:
    """The readable images of a class-per-folder tree, and the files that were skipped."""

    images: torch.Tensor
    labels: torch.Tensor
    paths: list[str]
    skipped: list[dict[str, str]]


def read_folder(
    location: str | Path, class_names: Sequence[str], resize: Any, workers: int = 4
) -> FolderImages:
    """Decode a class-per-folder tree (a folder or ``s3://`` prefix; folder aliases as in
    ingest); unreadable files and files outside the class folders are skipped and listed."""
    index = {name: i for i, name in enumerate(class_names)}
    files = list_labelled_files(str(location), strict=True)
    foreign = sorted({f.label for f in files if f.label is not None and f.label not in index})
    if foreign:
        raise ValueError(f"class folder(s) {foreign} are not among {list(class_names)}")

    def decode(file: LabelledFile) -> torch.Tensor | str:
        if file.label is None:
            return file.reason
        try:
            return resize(decode_image(file.read()))
        except ImageDecodeError as err:
            return str(err).removeprefix("payload: ")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(decode, files))
    keep = [i for i, d in enumerate(decoded) if isinstance(d, torch.Tensor)]
    skipped = [
        {"path": files[i].found_at, "reason": decoded[i]}
        for i in range(len(files))
        if not isinstance(decoded[i], torch.Tensor)
    ]
    if not keep:
        raise ValueError(f"none of the {len(files)} files under {location} is a readable image")
    return FolderImages(
        torch.stack([decoded[i] for i in keep]),
        torch.tensor([index[files[i].label] for i in keep], dtype=torch.long),
        [files[i].found_at for i in keep],
        skipped,
    )


def evaluate_folder(
    model: str | Path | ModelBundle, location: str | Path
) -> tuple[Evaluation, list[dict[str, str]]]:
    """Score a model (bundle, folder or ``s3://`` URI) on a class-per-folder tree of images
    (a folder or ``s3://`` prefix).

    Returns the evaluation and the files that were skipped as unreadable (with the reason).
    """
    bundle = model if isinstance(model, ModelBundle) else load_bundle(model)
    data = read_folder(location, bundle.class_names, bundle.preprocess.resize())
    evaluation = evaluate_bundle(bundle, data.images, data.labels, data.paths)
    evaluation.data = str(location)
    return evaluation, data.skipped


# -- command line ------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.evaluate",
        description="Score a saved model on a class-per-folder tree of images; prints JSON.",
    )
    parser.add_argument("--model", required=True, help="model folder or s3://bucket/prefix")
    parser.add_argument(
        "--data", required=True, help="<class>/<image> tree: a folder or s3://bucket/prefix"
    )
    parser.add_argument("--report", type=Path, help="also write the Markdown report here")
    args = parser.parse_args(argv)
    try:
        evaluation, skipped = evaluate_folder(args.model, args.data)
    except (OSError, ValueError, StorageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.report:
        args.report.write_text(render_report(evaluation))
    result = {"model": str(args.model), "data": str(args.data), **evaluation.metrics()}
    result["skipped_files"] = skipped
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

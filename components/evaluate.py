"""Evaluate: score a model bundle on the held-out test split with scikit-learn metrics."""

from dataclasses import dataclass
from pathlib import Path

import torch
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix

from brainmri.dataset import load_image_set
from brainmri.model import ModelBundle, pick_device
from components.split import load_split


@dataclass
class Evaluation:
    """Scores of one model on one split."""

    accuracy: float
    balanced_accuracy: float
    confusion: list[list[int]]
    class_names: list[str]
    num_images: int


def predict_labels(bundle: ModelBundle, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Predicted class indices for cached uint8 images, in batches."""
    normalize = bundle.preprocess.normalize()
    return torch.cat(
        [
            bundle.predict_proba(normalize(images[i : i + batch_size])).argmax(dim=1)
            for i in range(0, len(images), batch_size)
        ]
    )


def evaluate_model(
    model_dir: Path, dataset_dir: Path, split_csv: Path, split_name: str = "test"
) -> Evaluation:
    """Accuracy, balanced accuracy and confusion matrix of ``model_dir`` on one split."""
    bundle = ModelBundle.load(model_dir, pick_device())
    frame = load_split(split_csv)
    rows = frame[frame["split"] == split_name]
    if rows.empty:
        raise ValueError(f"{split_csv}: split '{split_name}' is empty; nothing to evaluate")
    data = load_image_set(
        dataset_dir, rows, bundle.class_names, bundle.preprocess, desc=f"decode {split_name}"
    )
    truth, predicted = data.labels.numpy(), predict_labels(bundle, data.images).numpy()
    labels = list(range(len(bundle.class_names)))
    return Evaluation(
        accuracy=float(accuracy_score(truth, predicted)),
        balanced_accuracy=float(balanced_accuracy_score(truth, predicted)),
        confusion=confusion_matrix(truth, predicted, labels=labels).tolist(),
        class_names=bundle.class_names,
        num_images=len(truth),
    )

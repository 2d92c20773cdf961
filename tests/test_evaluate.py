"""Evaluation metrics, the Markdown report, and the command line on any class-per-folder tree."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from brainmri import CLASS_NAMES
from brainmri.model import ModelBundle, build_model, get_backbone
from brainmri.storage import ObjectStore, S3Uri
from components.evaluate import main, score_predictions
from components.report import MAX_REPORT_CHARS, render_report


def constant_bundle(predicted: int = 0, image_size: int = 32) -> ModelBundle:
    """A tiny CNN that always predicts class ``predicted``."""
    model = build_model("tiny_cnn", len(CLASS_NAMES)).eval()
    with torch.no_grad():
        model[-1].weight.zero_()
        model[-1].bias.copy_(torch.eye(len(CLASS_NAMES))[predicted] * 5)
    preprocess = get_backbone("tiny_cnn").preprocess(image_size)
    return ModelBundle(model, "tiny_cnn", list(CLASS_NAMES), preprocess, {"version": "v-test"})


def test_scores_per_class_auc_roc_and_worst_mistakes() -> None:
    truth = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    proba = np.full((8, 4), 0.1)
    proba[np.arange(8), truth] = 0.7
    proba[1] = [0.05, 0.9, 0.03, 0.02]  # a confident mistake: glioma called meningioma
    proba[6] = [0.1, 0.1, 0.45, 0.35]  # a hesitant one: pituitary called notumor
    images = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    result = score_predictions(truth, proba, CLASS_NAMES, [f"f{i}.png" for i in range(8)], images)
    assert result.accuracy == 0.75 and result.confusion[0] == [1, 1, 0, 0]
    assert result.per_class["glioma"].recall == 0.5 and result.per_class["meningioma"].recall == 1
    assert result.per_class["meningioma"].precision == pytest.approx(2 / 3)
    assert 0.5 < result.macro_auc <= 1.0
    assert [m.path for m in result.worst] == ["f1.png", "f6.png"]  # most confident first
    assert result.worst[0].predicted_label == "meningioma" and result.worst[0].confidence == 0.9
    for name in (*CLASS_NAMES, "micro"):
        curve = result.roc[name]
        assert curve.fpr[0] == 0 and curve.tpr[-1] == 1 and max(curve.thresholds) <= 1.0
    json.dumps(result.metrics())  # plain JSON, thumbnails left out
    assert "thumbnail" not in json.dumps(result.metrics())
    assert set(result.scalar_metrics()) >= {"accuracy", "macro_auc", "glioma_recall"}


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_a_class_missing_from_the_data_has_no_auc() -> None:
    truth = np.array([0, 1, 2, 0])
    proba = np.eye(4)[[0, 1, 2, 3]].astype(float)
    result = score_predictions(truth, proba, CLASS_NAMES)
    assert result.per_class["pituitary"].auc is None and "pituitary" not in result.roc
    assert result.per_class["pituitary"].support == 0


def test_report_shows_mistakes_inline_and_the_model_card() -> None:
    truth = np.array([0, 1, 2, 3] * 3)
    proba = np.full((12, 4), 0.25)
    proba[:, 0] = 0.4  # everything called glioma
    images = torch.randint(0, 255, (12, 3, 160, 160), dtype=torch.uint8)
    result = score_predictions(truth, proba, CLASS_NAMES, [f"x{i}.jpg" for i in range(12)], images)
    result.model = {
        "backbone": "efficientnet_lite0",
        "preprocess": {"image_size": 160, "mean": [0.5] * 3, "std": [0.5] * 3},
        "metadata": {
            "train_config": {"epochs": 10, "learning_rate": 0.001},
            "data": {"split_fingerprint": "ab" * 32, "split_sizes": {"train": 8, "test": 12}},
            "best_val_accuracy": 0.99,
        },
    }
    report = render_report(result)
    assert report.count("](data:image/png;base64,") == 8  # the worst eight, inline
    assert "efficientnet_lite0" in report and "ab" * 32 in report and "| epochs | 10 |" in report
    assert "| glioma | 3 | 0 | 0 | 0 |" in report  # confusion matrix row
    assert len(report) < MAX_REPORT_CHARS


def demo_copy(demo_dir: Path, tmp_path: Path) -> Path:
    """The demo set with another release's folder names and one broken file."""
    data = tmp_path / "data"
    for source, name in zip(
        CLASS_NAMES, ("glioma_tumor", "meningioma", "no_tumor", "pituitary"), strict=True
    ):
        shutil.copytree(demo_dir / source, data / name)
    (data / "no_tumor" / "broken.jpg").write_bytes(b"not an image")
    return data


def test_cli_scores_any_class_per_folder_tree(
    demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    constant_bundle(predicted=2).save(tmp_path / "model")
    data = demo_copy(demo_dir, tmp_path)
    code = main(
        [
            "--model",
            str(tmp_path / "model"),
            "--data",
            str(data),
            "--report",
            str(tmp_path / "r.md"),
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_images"] == 48 and result["accuracy"] == 0.25
    assert result["per_class"]["notumor"]["recall"] == 1.0
    assert [s["path"] for s in result["skipped_files"]] == ["no_tumor/broken.jpg"]
    assert "Most confident mistakes" in (tmp_path / "r.md").read_text()


def test_cli_reads_the_model_from_minio(
    demo_dir: Path, tmp_path: Path, store: ObjectStore, bucket: str, capsys: pytest.CaptureFixture
) -> None:
    constant_bundle(predicted=0).save(tmp_path / "model")
    store.upload_dir(tmp_path / "model", S3Uri(bucket, "m/v1"), progress=False)
    assert main(["--model", f"s3://{bucket}/m/v1", "--data", str(demo_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["per_class"]["glioma"]["recall"] == 1.0


def test_cli_explains_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    constant_bundle().save(tmp_path / "model")
    (tmp_path / "data" / "kittens").mkdir(parents=True)
    assert main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "nowhere")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "model"), "--data", str(tmp_path / "data")]) == 2
    assert "unknown class folder 'kittens'" in capsys.readouterr().err

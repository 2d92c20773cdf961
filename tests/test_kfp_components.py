"""Each KFP wrapper called through its ``.python_func``, with real artifact objects, as the
kubeflow/pipelines-components tests do: the wrappers' own branches (metric names, the external
test set, the ROC artifacts, skipped promotion without a cluster) run here, not only inside a
kfp.local run of the whole DAG."""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

import pandas as pd
import pytest
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Markdown, Metrics, Model

from brainmri import CLASS_NAMES
from brainmri.inference_service import ImageNotAllowed
from brainmri.model import ModelBundle
from brainmri.registry import dataset_record_uri, production_record_uri
from brainmri.storage import ObjectStore
from components import kfp_components as step
from components.config import AugmentConfig, TrainConfig, to_dict

TINY_TRAINING = TrainConfig(backbone="tiny_cnn", image_size=32, epochs=2, batch_size=16)


def artifact(kind: type, folder: Path, name: str) -> Artifact:
    """An output artifact whose path is ``folder/name`` (as the KFP launcher would give it)."""
    folder.mkdir(parents=True, exist_ok=True)
    return kind(name=name, uri=str(folder / name))


@pytest.fixture(scope="module")
def trained(
    prepared: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Model, Metrics, float]:
    """The train wrapper run once on the prepared demo set."""
    dataset, split_csv = prepared
    out = tmp_path_factory.mktemp("train")
    model, metrics = artifact(Model, out, "model"), artifact(Metrics, out, "metrics")
    accuracy = step.train.python_func(
        dataset=Dataset(uri=str(dataset)),
        split_manifest_csv=Dataset(uri=str(split_csv)),
        model=model,
        training_metrics=metrics,
        train_config=to_dict(TINY_TRAINING),
        augment_config={"gamma": 0.0},  # a partial object: the other knobs keep their defaults
        checkpoint_uri="",
    )
    return model, metrics, accuracy


def test_split_logs_sizes_and_the_leakage_check(prepared: tuple[Path, Path], tmp_path: Path):
    dataset, _ = prepared
    manifest, metrics = artifact(Dataset, tmp_path, "split.csv"), artifact(Metrics, tmp_path, "m")
    step.split.python_func(
        dataset=Dataset(uri=str(dataset)),
        split_manifest_csv=manifest,
        split_metrics=metrics,
        val_fraction=0.25,
        test_fraction=0.25,
        seed=0,
    )
    frame = pd.read_csv(manifest.path)
    assert metrics.metadata == {
        "train_images": 24,
        "val_images": 12,
        "test_images": 12,
        "leaked_images": 0,
        "test_with_copy_in_training": 0,
        "test_with_near_duplicate_in_training": 0,
    }
    assert manifest.metadata == frame["split"].value_counts().to_dict()


def test_train_outputs_the_bundle_its_metadata_and_curves(
    trained: tuple[Model, Metrics, float],
) -> None:
    model, metrics, accuracy = trained
    bundle_meta = ModelBundle.read_metadata(Path(model.path))
    assert accuracy == bundle_meta["best_val_accuracy"] == model.metadata["val_accuracy"]
    assert bundle_meta["train_config"]["epochs"] == 2
    assert bundle_meta["augment"] == {**to_dict(AugmentConfig()), "gamma": 0.0}
    assert model.metadata["augment"]["gamma"] == 0.0 and model.metadata["backbone"] == "tiny_cnn"
    assert model.metadata["world_size"] == 1 and model.metadata["resumed_from_epoch"] is None
    logged = set(metrics.metadata)
    assert {"best_val_accuracy", "best_epoch", "epochs_run", "training_minutes"} <= logged
    assert {"epoch01_val_accuracy", "epoch02_val_accuracy", "epoch02_train_loss"} <= logged
    assert metrics.metadata["epochs_run"] == 2


def test_train_refuses_a_misspelt_knob(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, split_csv = prepared
    with pytest.raises(ValueError, match=r"unknown TrainConfig key\(s\) \['epoch'\]"):
        step.train.python_func(
            dataset=Dataset(uri=str(dataset)),
            split_manifest_csv=Dataset(uri=str(split_csv)),
            model=artifact(Model, tmp_path, "model"),
            training_metrics=artifact(Metrics, tmp_path, "metrics"),
            train_config={"epoch": 3},
            augment_config={},
            checkpoint_uri="",
        )


def test_evaluate_scores_the_test_and_external_sets_with_roc_per_class(
    prepared: tuple[Path, Path], trained: tuple[Model, Metrics, float], tmp_path: Path
) -> None:
    dataset, split_csv = prepared
    frame = pd.read_csv(split_csv)
    external = frame.index[frame["split"] == "test"][::2]  # half the test images, relabelled
    frame.loc[external, "split"] = "external_test"
    frame["near_training"] = ""
    frame.loc[external, "near_training"] = ["novel", "copy"] * (len(external) // 2)
    frame.to_csv(tmp_path / "split.csv", index=False)
    out = tmp_path / "out"
    rocs = {f"roc_{name}": artifact(ClassificationMetrics, out, name) for name in CLASS_NAMES}
    metrics, confusion = artifact(Metrics, out, "m"), artifact(ClassificationMetrics, out, "cm")
    report = artifact(Markdown, out, "report.md")
    predictions = artifact(Dataset, out, "predictions.csv")
    diagram = artifact(Artifact, out, "reliability.png")
    page = artifact(HTML, out, "report.html")
    result = step.evaluate.python_func(
        model=trained[0],
        dataset=Dataset(uri=str(dataset)),
        split_manifest_csv=Dataset(uri=str(tmp_path / "split.csv")),
        metrics=metrics,
        classification_metrics=confusion,
        report=report,
        html_report=page,
        predictions=predictions,
        reliability_diagram=diagram,
        **rocs,
    )
    assert result.accuracy == metrics.metadata["accuracy"]
    assert Path(diagram.path).read_bytes().startswith(b"\x89PNG")  # the reliability diagram
    assert {"ece", "ece_before", "set_coverage", "right_flagged"} <= set(metrics.metadata)
    answers = pd.read_csv(predictions.path)
    assert answers["correct"].mean() == pytest.approx(result.accuracy)
    assert {"accuracy_ci_low", "accuracy_ci_high", "errors"} <= set(metrics.metadata)
    low, high = metrics.metadata["accuracy_ci_low"], metrics.metadata["accuracy_ci_high"]
    assert (
        low <= result.accuracy <= high and metrics.metadata["errors"] == (~answers["correct"]).sum()
    )
    assert metrics.metadata["test_images"] == len(frame) - len(external) - 36  # train+val: 36
    assert {"external_test_accuracy", "external_test_balanced_accuracy"} <= set(metrics.metadata)
    parts = [metrics.metadata[f"external_test_{p}_test_images"] for p in ("novel", "near_copy")]
    assert parts == [len(external) // 2] * 2  # scored apart: novel, and with a copy in training
    assert {f"{name}_recall" for name in CLASS_NAMES} <= set(metrics.metadata)
    assert confusion.metadata["confusionMatrix"]["annotationSpecs"][0]["displayName"] == "glioma"
    for roc in rocs.values():  # every class is in the test split: every curve is logged
        assert roc.metadata["confidenceMetrics"]
    text = Path(report.path).read_text()
    assert "# Brain-MRI classifier evaluation" in text and "# External test set" in text
    assert "# External test set: novel images" in text
    assert 'id="confusion"' in Path(page.path).read_text()  # the HTML report, drawn


def test_ingest_records_the_dataset_and_decides_to_train(
    demo_dir: Path, store: ObjectStore, bucket: str, tmp_path: Path
) -> None:
    dataset, report = artifact(Dataset, tmp_path, "dataset"), artifact(Markdown, tmp_path, "r")
    proceed = step.ingest.python_func(
        source=str(demo_dir),
        dataset=dataset,
        data_report=report,
        copy_threshold=2.0,
        neighbour_threshold=8.0,
        models_bucket=bucket,
        model_name="m",
        skip_if_unchanged=True,
    )
    assert proceed is True  # no production model yet
    assert dataset.metadata["num_images"] == 48 and dataset.metadata["quarantined"] == 0
    assert store.exists(dataset_record_uri(bucket, "m", dataset.metadata["fingerprint"]))
    assert Path(report.path).read_text().startswith("# Data report")


def test_gate_and_promote_without_a_cluster(
    prepared: tuple[Path, Path],
    trained: tuple[Model, Metrics, float],
    store: ObjectStore,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dataset, split_csv = prepared
    gate_metrics, gate_report = (
        artifact(Metrics, tmp_path, "gate"),
        artifact(Markdown, tmp_path, "g"),
    )
    answers = artifact(Dataset, tmp_path, "predictions.csv")
    pd.DataFrame({"path": [], "true_label": [], "correct": []}).to_csv(answers.path, index=False)
    promote_ok = step.gate.python_func(
        accuracy=0.5,
        threshold=0.4,
        tolerance=0.0,
        max_recall_drop=0.02,
        model_name="m",
        models_bucket=bucket,
        dataset=Dataset(uri=str(dataset)),
        split_manifest_csv=Dataset(uri=str(split_csv)),
        predictions=answers,
        gate_metrics=gate_metrics,
        gate_report=gate_report,
    )
    assert promote_ok is True
    assert gate_metrics.metadata == {
        "challenger_accuracy": 0.5,
        "threshold": 0.4,
        "tolerance": 0.0,
        "max_recall_drop": 0.02,
        "promote": 1.0,
    }  # no champion yet: no champion_accuracy, nothing compared
    assert Path(gate_report.path).read_text().startswith("# Gate: PROMOTE")

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    model = Model(uri=str(tmp_path / "model"))
    shutil.copytree(trained[0].path, model.path)
    manifest = artifact(Artifact, tmp_path, "isvc.yaml")
    promote = partial(
        step.promote.python_func,
        model=model,
        isvc_manifest=manifest,
        model_name="m",
        models_bucket=bucket,
        namespace="brain-mri",
        serving_policy={"allowed_images": ["predictor:test"]},
        accuracy=0.5,
    )
    uri = promote(serving_image="predictor:test")
    record = store.get_json(production_record_uri(bucket, "m"))
    assert uri == record["storage_uri"] == manifest.metadata["storage_uri"]
    assert manifest.metadata["action"].startswith("skipped: no Kubernetes cluster")
    assert "kind: InferenceService" in Path(manifest.path).read_text()
    with pytest.raises(ImageNotAllowed, match=r"'evil:latest' is not allowed.*predictor:test"):
        promote(serving_image="evil:latest")
    assert store.get_json(production_record_uri(bucket, "m")) == record  # nothing changed

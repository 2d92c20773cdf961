"""The thin ``@dsl.component`` wrappers: map KFP artifacts to paths and call the step logic.

They are kept apart from the logic modules because KFP strips ``dsl.component`` from ``kfp.dsl``
inside a running task; the logic modules therefore never import KFP.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)

from components import COMPONENT_IMAGE


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def ingest(
    source: str,
    dataset: Output[Dataset],
    data_report: Output[Markdown],
    copy_threshold: float,
    neighbour_threshold: float,
    external_test_source: str = "",
    models_bucket: str = "models",
    model_name: str = "brain-mri-classifier",
    skip_if_unchanged: bool = False,
    max_quarantine_fraction: float = 0.05,
    strict_class_folders: bool = False,
) -> bool:
    """Validate and deduplicate the source images, group near-duplicates, report them; True when
    training should go on. The thresholds: NearDuplicateThresholds (grey levels at 64 px).

    The dataset fingerprint is in the dataset's metadata and its ``ingest_report.json``. (One
    plain output named ``Output``: kfp.local resolves conditions only on such outputs.)
    """
    from pathlib import Path

    from brainmri.dataset import MANIFEST_FILE, read_manifest
    from brainmri.registry import read_production_record
    from brainmri.storage import ObjectStore
    from components.config import NearDuplicateThresholds
    from components.data_report import render_data_report
    from components.ingest import check_new_data, ingest_dataset, record_dataset

    store = ObjectStore()
    report = ingest_dataset(
        source,
        Path(dataset.path),
        store,
        external_test_source=external_test_source,
        max_quarantine_fraction=max_quarantine_fraction,
        thresholds=NearDuplicateThresholds(copy_threshold, neighbour_threshold),
        strict_class_folders=strict_class_folders,
    )
    manifest = read_manifest(Path(dataset.path) / MANIFEST_FILE)
    Path(data_report.path).write_text(
        render_data_report(report, manifest, Path(dataset.path), source)
    )
    record_dataset(store, models_bucket, model_name, report, source)
    production = read_production_record(store, models_bucket, model_name)
    proceed, reason = check_new_data(report.fingerprint, production, skip_if_unchanged)
    print(f"new-data check: {'TRAIN' if proceed else 'STOP'}: {reason}")
    dataset.metadata.update(
        {
            "class_counts": report.class_counts,
            "fingerprint": report.fingerprint,
            "quarantined": len(report.quarantined),
            "hidden_files": len(report.hidden_files),
            "duplicates": len(report.duplicates),
            "label_conflicts": len(report.label_conflicts),
            "near_duplicate_groups": report.near_duplicates["groups"],
            "source": source,
        }
    )
    dataset.metadata["num_images"] = report.total
    return proceed


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def split(
    dataset: Input[Dataset],
    split_manifest_csv: Output[Dataset],
    split_metrics: Output[Metrics],
    val_fraction: float,
    test_fraction: float,
    seed: int,
    max_leaked_images: int = 0,
) -> None:
    """Write the group-aware split manifest; log its sizes and what the leakage check found
    (``max_leaked_images`` test images with a near-duplicate in train/val are tolerated)."""
    from pathlib import Path

    from brainmri.dataset import MANIFEST_FILE, read_manifest, read_near_pairs
    from components.split import EXTERNAL_SPLIT, NOVEL, leakage, split_manifest

    pairs = read_near_pairs(Path(dataset.path))
    frame = split_manifest(
        read_manifest(Path(dataset.path) / MANIFEST_FILE),
        val_fraction,
        test_fraction,
        seed,
        near_pairs=pairs,
        max_leaked=max_leaked_images,
    )
    frame.to_csv(split_manifest_csv.path, index=False)
    sizes = frame["split"].value_counts().to_dict()
    split_manifest_csv.metadata.update(sizes)
    for name, count in sizes.items():
        split_metrics.log_metric(f"{name}_images", count)
    found = leakage(frame, pairs)
    split_metrics.log_metric("leaked_images", found.pop("groups_in_two_splits"))
    for name, count in found.items():
        split_metrics.log_metric(name, count)
    external = frame[frame["split"] == EXTERNAL_SPLIT]
    if len(external) and "near_training" in frame:
        novel = external["near_training"] == NOVEL
        split_metrics.log_metric("external_novel_images", int(novel.sum()))
        split_metrics.log_metric("external_near_copy_images", int((~novel).sum()))


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    split_manifest_csv: Input[Dataset],
    model: Output[Model],
    training_metrics: Output[Metrics],
    train_config: dict,
    augment_config: dict,
    checkpoint_uri: str,
    workers: int = 1,
    namespace: str = "brain-mri",
    run_id: str = "local",
    models_bucket: str = "models",
    model_name: str = "brain-mri-classifier",
) -> float:
    """Train the classifier; outputs the model bundle and its best validation accuracy.

    ``train_config`` / ``augment_config`` hold TrainConfig / AugmentConfig fields (missing ones
    take the defaults; an unknown one fails the step, naming it). Saves the training state to
    ``checkpoint_uri`` after every epoch and, when the task is retried, resumes from it.
    ``workers > 1`` trains as a PyTorchJob (DDP) of that many replicas. With
    ``MLFLOW_TRACKING_URI`` set, the knobs and every epoch go to MLflow (experiment
    ``model_name``), and the run's id to the model's metadata.
    """
    from pathlib import Path

    from brainmri.tracking import RUN_ID_KEY
    from components.config import AugmentConfig, TrainConfig, from_dict, to_dict
    from components.experiment_log import epoch_logger, log_training, open_training_run
    from components.train import TrainRun
    from components.train_job import Replicas, run_training

    run = TrainRun(
        dataset.path,
        split_manifest_csv.path,
        model.path,
        from_dict(TrainConfig, train_config),
        from_dict(AugmentConfig, augment_config),
        checkpoint_uri or None,
    )
    data = {k: dataset.metadata.get(k) for k in ("source", "fingerprint", "num_images")}
    params = {"train": to_dict(run.train), "augment": to_dict(run.augment) if run.augment else {}}
    params["workers"] = workers
    tracked = open_training_run(model_name, run_id, params, data, Path(split_manifest_csv.path))
    try:
        replicas = Replicas(workers, namespace, run_id, models_bucket)
        trained = run_training(run, replicas, on_epoch=epoch_logger(tracked))
    except BaseException:
        if tracked is not None:
            tracked.finish("FAILED")
        raise
    model.metadata.update(
        {
            "backbone": run.train.backbone,
            "val_accuracy": trained.best_val_accuracy,
            "best_epoch": trained.best_epoch,
            "resumed_from_epoch": trained.resumed_from_epoch,
            "world_size": trained.world_size,
            "augment": trained.augment,
        }
    )
    summary = {
        "best_val_accuracy": trained.best_val_accuracy,
        "best_epoch": trained.best_epoch,
        "epochs_run": len(trained.history),
        "training_minutes": trained.training_seconds / 60,
        "train_images_per_s": trained.train_images_per_s,
    }
    for name, value in summary.items():
        training_metrics.log_metric(name, value)
    log_training(tracked, trained.history, summary)
    if tracked is not None:
        model.metadata[RUN_ID_KEY] = tracked.run_id
    for epoch in trained.history:  # per-epoch curves, one scalar each (Metrics holds scalars)
        prefix = f"epoch{epoch['epoch']:02d}"
        training_metrics.log_metric(f"{prefix}_val_accuracy", epoch["val_accuracy"])
        training_metrics.log_metric(f"{prefix}_train_loss", epoch["train_loss"])
    return trained.best_val_accuracy


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    dataset: Input[Dataset],
    split_manifest_csv: Input[Dataset],
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    roc_glioma: Output[ClassificationMetrics],
    roc_meningioma: Output[ClassificationMetrics],
    roc_notumor: Output[ClassificationMetrics],
    roc_pituitary: Output[ClassificationMetrics],
    report: Output[Markdown],
    html_report: Output[HTML],
    predictions: Output[Dataset],
    reliability_diagram: Output[Artifact],
) -> NamedTuple("EvaluateOutputs", [("accuracy", float)]):
    """Score the model on the test split: KFP metrics with 95 % intervals and error counts,
    confusion matrix, ROC curves (micro average with the confusion matrix, one-vs-rest per class
    in roc_<class>), the per-image predictions (for the gate), and a Markdown report with the
    worst mistakes, calibration and uncertainty (with the reliability diagram, also a PNG
    artifact), heatmaps of where the evidence is, and the model card; the same as one HTML page
    with every figure drawn (:mod:`components.html_report`); an external test set is scored
    whole, on its novel images and on those with a near-copy in training. Returns the
    accuracy."""
    import base64
    from pathlib import Path
    from typing import NamedTuple

    from brainmri.model import load_bundle
    from brainmri.tracking import RUN_ID_KEY, attach_run
    from components.evaluate import evaluate_split, external_parts
    from components.experiment_log import log_evaluation
    from components.html_report import render_html
    from components.report import render_report
    from components.split import EXTERNAL_SPLIT, load_split

    split_csv = Path(split_manifest_csv.path)
    tracked = attach_run(model.metadata.get(RUN_ID_KEY))  # checked before the work
    bundle = load_bundle(Path(model.path))
    result = evaluate_split(bundle, Path(dataset.path), split_csv)
    test_scores = result.scalar_metrics()
    for name, value in test_scores.items():
        metrics.log_metric(name, value)
    result.predictions.to_csv(predictions.path, index=False)
    if result.trust is not None and result.trust.reliability_png:
        Path(reliability_diagram.path).write_bytes(base64.b64decode(result.trust.reliability_png))
        reliability_diagram.metadata["mime_type"] = "image/png"
    classification_metrics.log_confusion_matrix(result.class_names, result.confusion)
    if "micro" in result.roc:
        curve = result.roc["micro"]
        classification_metrics.log_roc_curve(curve.fpr, curve.tpr, curve.thresholds)
    per_class = {
        "glioma": roc_glioma,
        "meningioma": roc_meningioma,
        "notumor": roc_notumor,
        "pituitary": roc_pituitary,
    }
    for name, artifact in per_class.items():
        if name in result.roc:
            curve = result.roc[name]
            artifact.log_roc_curve(curve.fpr, curve.tpr, curve.thresholds)
    text = render_report(result)
    frame = load_split(split_csv)
    Path(html_report.path).write_text(render_html(result, frame))
    if (frame["split"] == EXTERNAL_SPLIT).any():
        external = evaluate_split(bundle, Path(dataset.path), split_csv, EXTERNAL_SPLIT)
        for part, scores in {"": external, **external_parts(external, frame)}.items():
            prefix = f"external_test{'_' + part if part else ''}"
            for name in ("accuracy", "balanced_accuracy", "errors", "test_images"):
                metrics.log_metric(f"{prefix}_{name}", scores.scalar_metrics()[name])
            title = f"External test set{': ' + part.replace('_', ' ') + ' images' if part else ''}"
            text += "\n" + render_report(scores, title=title)
    Path(report.path).write_text(text)
    named = {
        html_report.path: "report.html",
        report.path: "report.md",
        predictions.path: "predictions.csv",
    }
    log_evaluation(tracked, test_scores, named)
    if tracked is not None:
        predictions.metadata[RUN_ID_KEY] = tracked.run_id  # for the gate
    return NamedTuple("EvaluateOutputs", [("accuracy", float)])(result.accuracy)


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def gate(
    accuracy: float,
    threshold: float,
    tolerance: float,
    max_recall_drop: float,
    model_name: str,
    models_bucket: str,
    dataset: Input[Dataset],
    split_manifest_csv: Input[Dataset],
    predictions: Input[Dataset],
    gate_metrics: Output[Metrics],
    gate_report: Output[Markdown],
    namespace: str = "brain-mri",
    champion_from: str = "production",
) -> bool:
    """Champion/challenger, like with like: True when the model may be promoted; logs the
    decision, both scores and the paired counts, and shows them as Markdown (and in MLflow
    when tracking is on). ``champion_from`` "mlflow": the champion is MLflow's ``champion``
    alias instead of the production record."""
    from pathlib import Path

    import pandas as pd

    from brainmri.kube import cluster_api_client
    from brainmri.tracking import RUN_ID_KEY, attach_run
    from components.experiment_log import log_gate
    from components.gate import gate_model, render_gate_report

    tracked = attach_run(predictions.metadata.get(RUN_ID_KEY))
    decision = gate_model(
        accuracy,
        threshold,
        models_bucket,
        model_name,
        pd.read_csv(predictions.path),
        Path(dataset.path),
        Path(split_manifest_csv.path),
        tolerance=tolerance,
        max_recall_drop=max_recall_drop,
        api_client=cluster_api_client(),
        namespace=namespace,
        champion_from=champion_from,
    )
    log_gate(
        tracked,
        decision.promote,
        {
            "challenger_accuracy": decision.challenger_accuracy,
            "champion_accuracy": decision.champion_accuracy,
        },
    )
    gate_metrics.log_metric("challenger_accuracy", decision.challenger_accuracy)
    if decision.champion_accuracy is not None:
        gate_metrics.log_metric("champion_accuracy", decision.champion_accuracy)
    for name in ("images", "only_first_right", "only_second_right", "mcnemar_p"):
        if name in decision.compared:
            gate_metrics.log_metric(f"compared_{name}", float(decision.compared[name]))
    gate_metrics.log_metric("threshold", threshold)
    gate_metrics.log_metric("tolerance", tolerance)
    gate_metrics.log_metric("max_recall_drop", max_recall_drop)
    gate_metrics.log_metric("promote", float(decision.promote))
    Path(gate_report.path).write_text(render_gate_report(decision))
    print(f"gate: {'PROMOTE' if decision.promote else 'KEEP PRODUCTION'}: {decision.reason}")
    return decision.promote


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def promote(
    model: Input[Model],
    isvc_manifest: Output[Artifact],
    model_name: str,
    models_bucket: str,
    namespace: str,
    serving_image: str,
    serving_policy: dict,
    accuracy: float,
    canary_traffic_percent: int = -1,
    ready_timeout_s: float = 600.0,
) -> str:
    """Publish the model version, roll the InferenceService to it and wait until the new model
    serves (rolling back on failure); returns the version's storage URI. ``serving_policy``
    (ServingPolicy, fixed at compile time) allows the images and sets the deployment;
    ``canary_traffic_percent`` -1 sends all traffic to the new version. With tracking on, the
    served version is registered in MLflow and its ``champion`` alias moved to it; if MLflow
    fails then, production stands (it serves) and the step says so."""
    from pathlib import Path

    from brainmri.inference_service import ServingPolicy
    from brainmri.kube import cluster_api_client
    from brainmri.model import ModelBundle
    from brainmri.tracking import RUN_ID_KEY
    from components.experiment_log import registry_note
    from components.promote import promote_model

    canary = canary_traffic_percent if canary_traffic_percent >= 0 else None
    spec = ServingPolicy.from_dict(serving_policy).spec(
        model_name, namespace, serving_image, canary
    )
    trained_on = ModelBundle.read_metadata(Path(model.path))
    result = promote_model(
        Path(model.path),
        model_name,
        models_bucket,
        spec,
        api_client=cluster_api_client(),
        accuracy=accuracy,
        data_fingerprint=trained_on.get("data", {}).get("dataset_fingerprint"),
        wait_ready_timeout_s=ready_timeout_s,
    )
    Path(isvc_manifest.path).write_text(result.isvc_yaml)
    registered = registry_note(
        model_name,
        result.version,
        result.storage_uri,
        trained_on,
        accuracy,
        model.metadata.get(RUN_ID_KEY),
    )
    isvc_manifest.metadata.update(
        {
            "version": result.version,
            "storage_uri": result.storage_uri,
            "action": result.isvc_action,
            "previous_version": result.previous_version or "",
            "ready": result.ready_detail,
            "mlflow": registered,
        }
    )
    print(
        f"promoted {result.version} -> {result.storage_uri}; InferenceService: {result.isvc_action}"
    )
    return result.storage_uri

"""The thin ``@dsl.component`` wrappers: map KFP artifacts to paths and call the step logic.

They are kept apart from the logic modules because KFP strips ``dsl.component`` from ``kfp.dsl``
inside a running task; the logic modules therefore never import KFP.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import (
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
    external_test_source: str = "",
    models_bucket: str = "models",
    model_name: str = "brain-mri-classifier",
    skip_if_unchanged: bool = False,
    max_quarantine_fraction: float = 0.05,
) -> NamedTuple("IngestOutputs", [("num_images", int), ("fingerprint", str), ("proceed", bool)]):
    """Validate and deduplicate the source images, report them, and decide whether to train."""
    from pathlib import Path
    from typing import NamedTuple

    from brainmri.dataset import MANIFEST_FILE, read_manifest
    from brainmri.registry import read_production_record
    from brainmri.storage import ObjectStore
    from components.data_report import render_data_report
    from components.ingest import check_new_data, ingest_dataset, record_dataset

    store = ObjectStore()
    report = ingest_dataset(
        source,
        Path(dataset.path),
        store,
        external_test_source=external_test_source,
        max_quarantine_fraction=max_quarantine_fraction,
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
            "duplicates": len(report.duplicates),
            "label_conflicts": len(report.label_conflicts),
            "source": source,
        }
    )
    return NamedTuple(
        "IngestOutputs", [("num_images", int), ("fingerprint", str), ("proceed", bool)]
    )(report.total, report.fingerprint, proceed)


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def split(
    dataset: Input[Dataset],
    split_manifest_csv: Output[Dataset],
    split_metrics: Output[Metrics],
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> None:
    """Write the duplicate-aware split manifest and log its sizes and the leakage check."""
    from pathlib import Path

    from brainmri.dataset import MANIFEST_FILE, read_manifest
    from components.split import leaked_groups, split_manifest

    frame = split_manifest(
        read_manifest(Path(dataset.path) / MANIFEST_FILE), val_fraction, test_fraction, seed
    )
    frame.to_csv(split_manifest_csv.path, index=False)
    sizes = frame["split"].value_counts().to_dict()
    split_manifest_csv.metadata.update(sizes)
    for name, count in sizes.items():
        split_metrics.log_metric(f"{name}_images", count)
    split_metrics.log_metric("leaked_images", leaked_groups(frame))


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def augment(
    augment_config: Output[Artifact],
    rotation_degrees: float,
    brightness: float,
    contrast: float,
    hflip_probability: float,
) -> None:
    """Validate the augmentation parameters and write them as a JSON artifact."""
    from components.augment import AugmentConfig

    config = AugmentConfig(rotation_degrees, brightness, contrast, hflip_probability)
    config.save(augment_config.path)
    augment_config.metadata.update(vars(config))


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    split_manifest_csv: Input[Dataset],
    augment_config: Input[Artifact],
    model: Output[Model],
    backbone: str,
    image_size: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
) -> float:
    """Train the classifier; outputs the model bundle and its best validation accuracy."""
    from pathlib import Path

    from components.augment import AugmentConfig
    from components.train import TrainConfig, train_model

    config = TrainConfig(
        backbone=backbone,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
    )
    result = train_model(
        Path(dataset.path),
        Path(split_manifest_csv.path),
        Path(model.path),
        config,
        AugmentConfig.load(Path(augment_config.path)),
    )
    model.metadata.update({"backbone": backbone, "val_accuracy": result.best_val_accuracy})
    return result.best_val_accuracy


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def evaluate(
    model: Input[Model],
    dataset: Input[Dataset],
    split_manifest_csv: Input[Dataset],
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
) -> NamedTuple("EvaluateOutputs", [("accuracy", float)]):
    """Score the model on the test split; logs KFP metrics and returns the accuracy."""
    from pathlib import Path
    from typing import NamedTuple

    from components.evaluate import evaluate_model

    result = evaluate_model(Path(model.path), Path(dataset.path), Path(split_manifest_csv.path))
    metrics.log_metric("accuracy", result.accuracy)
    metrics.log_metric("balanced_accuracy", result.balanced_accuracy)
    metrics.log_metric("test_images", result.num_images)
    classification_metrics.log_confusion_matrix(result.class_names, result.confusion)
    return NamedTuple("EvaluateOutputs", [("accuracy", float)])(result.accuracy)


@dsl.component(base_image=COMPONENT_IMAGE, install_kfp_package=False)
def gate(accuracy: float, threshold: float) -> bool:
    """Return True when the model may be promoted; prints the reason."""
    from components.gate import gate_decision

    decision = gate_decision(accuracy, threshold)
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
    accuracy: float,
) -> str:
    """Publish the model version and create/patch the InferenceService; returns its storage URI."""
    from pathlib import Path

    from brainmri.inference_service import InferenceServiceSpec, cluster_api_client
    from components.promote import promote_model

    spec = InferenceServiceSpec(
        name=model_name,
        namespace=namespace,
        storage_uri="",
        image=serving_image,
        model_name=model_name,
    )
    result = promote_model(
        Path(model.path),
        model_name,
        models_bucket,
        spec,
        api_client=cluster_api_client(),
        accuracy=accuracy,
    )
    Path(isvc_manifest.path).write_text(result.isvc_yaml)
    isvc_manifest.metadata.update(
        {"version": result.version, "storage_uri": result.storage_uri, "action": result.isvc_action}
    )
    print(
        f"promoted {result.version} -> {result.storage_uri}; InferenceService: {result.isvc_action}"
    )
    return result.storage_uri

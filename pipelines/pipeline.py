"""The training DAG: ingest -> split -> augment -> train -> evaluate -> gate -> [promote]."""

from kfp import dsl

from components.augment import AugmentConfig
from components.kfp_components import augment, evaluate, gate, ingest, promote, split, train
from components.train import TrainConfig

_TRAIN = TrainConfig()
_AUGMENT = AugmentConfig()
PIPELINE_NAME = "brain-mri-classifier"


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Train, evaluate, gate and serve a 4-class brain-MRI tumour classifier.",
)
def brain_mri_pipeline(
    source: str,
    threshold: float = 0.9,
    model_name: str = "brain-mri-classifier",
    models_bucket: str = "models",
    namespace: str = "brain-mri",
    serving_image: str = "ghcr.io/brain-mri-mlops/predictor:0.1.0",
    backbone: str = _TRAIN.backbone,
    image_size: int = _TRAIN.image_size,
    epochs: int = _TRAIN.epochs,
    batch_size: int = _TRAIN.batch_size,
    learning_rate: float = _TRAIN.learning_rate,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    seed: int = _TRAIN.seed,
    rotation_degrees: float = _AUGMENT.rotation_degrees,
    brightness: float = _AUGMENT.brightness,
    contrast: float = _AUGMENT.contrast,
    hflip_probability: float = _AUGMENT.hflip_probability,
) -> None:
    """``source`` is a class-per-folder tree: a local folder or ``s3://bucket/prefix``."""
    ingest_task = ingest(source=source)
    split_task = split(
        dataset=ingest_task.outputs["dataset"],
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )
    augment_task = augment(
        rotation_degrees=rotation_degrees,
        brightness=brightness,
        contrast=contrast,
        hflip_probability=hflip_probability,
    )
    train_task = train(
        dataset=ingest_task.outputs["dataset"],
        split_manifest_csv=split_task.outputs["split_manifest_csv"],
        augment_config=augment_task.outputs["augment_config"],
        backbone=backbone,
        image_size=image_size,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        seed=seed,
    )
    evaluate_task = evaluate(
        model=train_task.outputs["model"],
        dataset=ingest_task.outputs["dataset"],
        split_manifest_csv=split_task.outputs["split_manifest_csv"],
    )
    gate_task = gate(accuracy=evaluate_task.outputs["accuracy"], threshold=threshold)
    with dsl.If(gate_task.output == True, name="accuracy-gate"):  # noqa: E712 - KFP condition
        promote(
            model=train_task.outputs["model"],
            model_name=model_name,
            models_bucket=models_bucket,
            namespace=namespace,
            serving_image=serving_image,
            accuracy=evaluate_task.outputs["accuracy"],
        )

"""The training DAG: ingest -> split -> augment -> train -> evaluate -> gate -> [promote].

``build_pipeline(options)`` returns the ``@dsl.pipeline`` for one cluster configuration
(:class:`~pipelines.cluster.ClusterOptions`: images, GPU, retries, caching, secrets, resources);
the DAG itself is written once, below, and ends with ``apply_cluster_options`` configuring every
task it created. A new step needs a ``StepPolicy`` in ``pipelines/cluster.py``.
"""

from kfp import dsl
from kfp.dsl.graph_component import GraphComponent

from components.augment import AugmentConfig
from components.kfp_components import augment, evaluate, gate, ingest, promote, split, train
from components.train import TrainConfig
from pipelines.cluster import ClusterOptions, apply_cluster_options

_TRAIN = TrainConfig()
_AUGMENT = AugmentConfig()
PIPELINE_NAME = "brain-mri-classifier"
PIPELINE_DESCRIPTION = "Train, evaluate, gate and serve a 4-class brain-MRI tumour classifier."


def build_pipeline(options: ClusterOptions | None = None) -> GraphComponent:
    """The pipeline compiled for ``options`` (default: ``ClusterOptions()``, manifests/base)."""
    options = options or ClusterOptions()

    @dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)
    def brain_mri_pipeline(
        source: str,
        external_test_source: str = "",
        skip_if_unchanged: bool = False,
        max_quarantine_fraction: float = 0.05,
        threshold: float = 0.9,
        model_name: str = "brain-mri-classifier",
        models_bucket: str = "models",
        namespace: str = "brain-mri",
        serving_image: str = options.serving_image,
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
        """``source`` is a class-per-folder tree: a local folder or ``s3://bucket/prefix``.

        ``external_test_source`` (optional, same layout) is scored but never trained on;
        ``skip_if_unchanged`` stops after ingest when the data equals production's.
        """
        ingest_task = ingest(
            source=source,
            external_test_source=external_test_source,
            models_bucket=models_bucket,
            model_name=model_name,
            skip_if_unchanged=skip_if_unchanged,
            max_quarantine_fraction=max_quarantine_fraction,
        )
        with dsl.If(ingest_task.outputs["proceed"] == True, name="new-data"):  # noqa: E712
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
        apply_cluster_options(options)  # images, resources, GPU, retries, caching, secrets

    return brain_mri_pipeline


# the default cluster build: what `python -m pipelines compile` writes and the KFP UI gets
brain_mri_pipeline = build_pipeline()

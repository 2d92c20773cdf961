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
from components.split import TEST_FRACTION, VAL_FRACTION
from components.train import REAL_DATA_RECIPE
from pipelines.cluster import ClusterOptions, apply_cluster_options

_TRAIN = REAL_DATA_RECIPE  # what runs submitted from the KFP UI train; make run passes the demo's
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
        tolerance: float = 0.005,
        model_name: str = "brain-mri-classifier",
        models_bucket: str = "models",
        namespace: str = "brain-mri",
        serving_image: str = options.serving_image,
        backbone: str = _TRAIN.backbone,
        image_size: int = _TRAIN.image_size,
        epochs: int = _TRAIN.epochs,
        batch_size: int = _TRAIN.batch_size,
        learning_rate: float = _TRAIN.learning_rate,
        val_fraction: float = VAL_FRACTION,
        test_fraction: float = TEST_FRACTION,
        seed: int = _TRAIN.seed,
        rotation_degrees: float = _AUGMENT.rotation_degrees,
        brightness: float = _AUGMENT.brightness,
        contrast: float = _AUGMENT.contrast,
        hflip_probability: float = _AUGMENT.hflip_probability,
        vflip_probability: float = _AUGMENT.vflip_probability,
        crop_scale: float = _AUGMENT.crop_scale,
        gamma: float = _AUGMENT.gamma,
        bias_field: float = _AUGMENT.bias_field,
        noise_std: float = _AUGMENT.noise_std,
        noise_kind: str = _AUGMENT.noise_kind,
        mri_probability: float = _AUGMENT.mri_probability,
        pretrained: bool = _TRAIN.pretrained,
        head_epochs: int = _TRAIN.head_epochs,
        schedule: str = _TRAIN.schedule,
        patience: int = _TRAIN.patience,
        label_smoothing: float = _TRAIN.label_smoothing,
        weight_decay: float = _TRAIN.weight_decay,
        workers: int = 1,
        canary_traffic_percent: int = -1,
        ready_timeout_s: float = 600.0,
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
        with dsl.If(ingest_task.outputs["Output"] == True, name="new-data"):  # noqa: E712
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
                vflip_probability=vflip_probability,
                crop_scale=crop_scale,
                gamma=gamma,
                bias_field=bias_field,
                noise_std=noise_std,
                noise_kind=noise_kind,
                mri_probability=mri_probability,
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
                pretrained=pretrained,
                head_epochs=head_epochs,
                schedule=schedule,
                patience=patience,
                label_smoothing=label_smoothing,
                weight_decay=weight_decay,
                # one folder per run: a retried train task resumes from its last epoch
                checkpoint_uri=f"s3://{models_bucket}/checkpoints/{dsl.PIPELINE_JOB_ID_PLACEHOLDER}",
                workers=workers,
                namespace=namespace,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                models_bucket=models_bucket,
            )
            evaluate_task = evaluate(
                model=train_task.outputs["model"],
                dataset=ingest_task.outputs["dataset"],
                split_manifest_csv=split_task.outputs["split_manifest_csv"],
            )
            gate_task = gate(
                accuracy=evaluate_task.outputs["accuracy"],
                threshold=threshold,
                tolerance=tolerance,
                model_name=model_name,
                models_bucket=models_bucket,
                dataset=ingest_task.outputs["dataset"],
                split_manifest_csv=split_task.outputs["split_manifest_csv"],
            )
            promote_ok = gate_task.outputs["Output"] == True  # noqa: E712 - a KFP condition
            with dsl.If(promote_ok, name="accuracy-gate"):
                promote(
                    model=train_task.outputs["model"],
                    model_name=model_name,
                    models_bucket=models_bucket,
                    namespace=namespace,
                    serving_image=serving_image,
                    accuracy=evaluate_task.outputs["accuracy"],
                    canary_traffic_percent=canary_traffic_percent,
                    ready_timeout_s=ready_timeout_s,
                )
        apply_cluster_options(options)  # images, resources, GPU, retries, caching, secrets

    return brain_mri_pipeline


# the default cluster build: what `python -m pipelines compile` writes and the KFP UI gets
brain_mri_pipeline = build_pipeline()

"""The training DAG: ingest -> split -> train -> evaluate -> gate -> [promote].

``build_pipeline(options)`` returns the ``@dsl.pipeline`` for one cluster configuration
(:class:`~pipelines.cluster.ClusterOptions`: images, GPU, retries, caching, secrets, resources);
the DAG itself is written once, below, and ends with ``apply_cluster_options`` configuring every
task it created. A new step needs a ``StepPolicy`` in ``pipelines/cluster.py``.

Training and augmentation knobs are two JSON-object parameters, ``train`` and ``augment``, whose
defaults are ``TrainConfig()`` and ``AugmentConfig()`` (:mod:`components.config`): a knob added
there appears here, in the KFP UI with its default, and in the command line, with no edit here.
Compiling needs only kfp: nothing imported here pulls in torch.
"""

from kfp import dsl
from kfp.dsl.graph_component import GraphComponent

from components import kfp_components as step
from components.config import (
    PROMOTION_THRESHOLD,
    TEST_FRACTION,
    VAL_FRACTION,
    AugmentConfig,
    NearDuplicateThresholds,
    TrainConfig,
    describe,
    to_dict,
)
from pipelines.cluster import ClusterOptions, apply_cluster_options

PIPELINE_NAME = "brain-mri-classifier"
PIPELINE_DESCRIPTION = "Train, evaluate, gate and serve a 4-class brain-MRI tumour classifier."


def _one_line(text: str) -> str:
    return "; ".join(text.splitlines()).replace("``", "")


# KFP turns the Args section into the parameters' descriptions (shown where a run is created)
PIPELINE_DOC = f"""{PIPELINE_DESCRIPTION}

Args:
    source: the class-per-folder tree of slices to train on: a folder or s3://bucket/prefix.
    external_test_source: optional second tree, scored but never trained on.
    skip_if_unchanged: stop after ingest when production was trained on this very data.
    max_quarantine_fraction: fail when more than this share of the files is unreadable or too small to be a slice.
    strict_class_folders: fail on a folder that is not a class (default: quarantine its files and report them).
    copy_threshold: two images this near (mean absolute difference of 64 px greyscale thumbnails, grey levels of 255, mirror-aware) are copies of one image: one is kept per class, under two labels both are excluded.
    neighbour_threshold: images this near are neighbours (adjacent slices); joined images form a group that the split keeps on one side.
    threshold: test accuracy a model must reach before it may be promoted.
    tolerance: extra errors per compared image a model may make against production (paired, on test images neither trained on) and still win.
    max_recall_drop: the most any class's recall may drop against production.
    champion_from: where the gate finds the model to beat: production (the production record) or mlflow (the registry's champion alias; needs MLFLOW_TRACKING_URI).
    model_name: the InferenceService and the folder in the models bucket.
    models_bucket: bucket of model versions, records and checkpoints.
    namespace: Kubernetes namespace of the InferenceService (and of a PyTorchJob).
    serving_image: the predictor image the InferenceService runs; one of the images the pipeline was compiled to allow.
    val_fraction: share of the images in the validation split.
    test_fraction: share of the images in the held-out test split.
    split_seed: seed of the train/val/test assignment.
    max_leaked_images: test images with a copy or neighbour in train/val that the split tolerates (0: none).
    train: training knobs (TrainConfig); a key left out takes its default. {_one_line(describe(TrainConfig))}
    augment: training-time augmentation (AugmentConfig); a key left out takes its default. {_one_line(describe(AugmentConfig))}
    workers: training replicas; above 1, a PyTorchJob trains with DDP.
    canary_traffic_percent: share of traffic for a new version; -1 sends it all.
    ready_timeout_s: how long the InferenceService may take to report Ready before rollback.
"""  # noqa: E501


def build_pipeline(options: ClusterOptions | None = None) -> GraphComponent:
    """The pipeline compiled for ``options`` (default: ``ClusterOptions()``, manifests/base).

    Long on purpose: the DAG is written here once, one call per step with its inputs by name.
    """
    options = options or ClusterOptions()

    def brain_mri_pipeline(
        source: str,
        external_test_source: str = "",
        skip_if_unchanged: bool = False,
        max_quarantine_fraction: float = 0.05,
        strict_class_folders: bool = False,
        copy_threshold: float = NearDuplicateThresholds().copy,
        neighbour_threshold: float = NearDuplicateThresholds().neighbour,
        threshold: float = PROMOTION_THRESHOLD,
        tolerance: float = 0.005,
        max_recall_drop: float = 0.02,
        champion_from: str = "production",
        model_name: str = "brain-mri-classifier",
        models_bucket: str = "models",
        namespace: str = "brain-mri",
        serving_image: str = options.serving_image,
        val_fraction: float = VAL_FRACTION,
        test_fraction: float = TEST_FRACTION,
        split_seed: int = 0,
        max_leaked_images: int = 0,
        train: dict = to_dict(TrainConfig()),  # noqa: B008 - a KFP default, evaluated once
        augment: dict = to_dict(AugmentConfig()),  # noqa: B008
        workers: int = 1,
        canary_traffic_percent: int = -1,
        ready_timeout_s: float = 600.0,
    ) -> None:
        ingest_task = step.ingest(
            source=source,
            external_test_source=external_test_source,
            models_bucket=models_bucket,
            model_name=model_name,
            skip_if_unchanged=skip_if_unchanged,
            max_quarantine_fraction=max_quarantine_fraction,
            strict_class_folders=strict_class_folders,
            copy_threshold=copy_threshold,
            neighbour_threshold=neighbour_threshold,
        )
        with dsl.If(ingest_task.outputs["Output"] == True, name="new-data"):  # noqa: E712
            split_task = step.split(
                dataset=ingest_task.outputs["dataset"],
                val_fraction=val_fraction,
                test_fraction=test_fraction,
                seed=split_seed,
                max_leaked_images=max_leaked_images,
            )
            train_task = step.train(
                dataset=ingest_task.outputs["dataset"],
                split_manifest_csv=split_task.outputs["split_manifest_csv"],
                train_config=train,
                augment_config=augment,
                # one folder per run: a retried train task resumes from its last epoch
                checkpoint_uri=f"s3://{models_bucket}/checkpoints/{dsl.PIPELINE_JOB_ID_PLACEHOLDER}",
                workers=workers,
                namespace=namespace,
                run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
                models_bucket=models_bucket,
                model_name=model_name,
            )
            evaluate_task = step.evaluate(
                model=train_task.outputs["model"],
                dataset=ingest_task.outputs["dataset"],
                split_manifest_csv=split_task.outputs["split_manifest_csv"],
            )
            gate_task = step.gate(
                accuracy=evaluate_task.outputs["accuracy"],
                threshold=threshold,
                tolerance=tolerance,
                max_recall_drop=max_recall_drop,
                model_name=model_name,
                models_bucket=models_bucket,
                dataset=ingest_task.outputs["dataset"],
                split_manifest_csv=split_task.outputs["split_manifest_csv"],
                predictions=evaluate_task.outputs["predictions"],
                namespace=namespace,
                champion_from=champion_from,
            )
            promote_ok = gate_task.outputs["Output"] == True  # noqa: E712 - a KFP condition
            with dsl.If(promote_ok, name="accuracy-gate"):
                step.promote(
                    model=train_task.outputs["model"],
                    model_name=model_name,
                    models_bucket=models_bucket,
                    namespace=namespace,
                    serving_image=serving_image,
                    serving_policy=options.serving_policy().to_dict(),  # fixed at compile time
                    accuracy=evaluate_task.outputs["accuracy"],
                    canary_traffic_percent=canary_traffic_percent,
                    ready_timeout_s=ready_timeout_s,
                )
        apply_cluster_options(options)  # images, resources, GPU, retries, caching, secrets

    brain_mri_pipeline.__doc__ = PIPELINE_DOC
    return dsl.pipeline(name=PIPELINE_NAME, description=PIPELINE_DESCRIPTION)(brain_mri_pipeline)


# the default cluster build: what `python -m pipelines compile` writes and the KFP UI gets
brain_mri_pipeline = build_pipeline()

"""Compile-time options for running the DAG on a Kubernetes cluster, and the code that applies them.

Every step of the pipeline has a :class:`StepPolicy` in :data:`STEP_POLICIES`: whether it reads or
writes object storage (then it gets the MinIO credentials from a Kubernetes Secret, the endpoint,
and retries with exponential backoff), whether KFP may reuse a cached result, and its CPU/memory
requests and limits. :class:`ClusterOptions` adds what differs between clusters: images, GPU
scheduling for ``train``, the Secret's name, the S3 endpoint. ``apply_cluster_options`` is called
at the end of the pipeline function and configures every task it created, so a new step cannot be
left unconfigured: the pipeline refuses to build until the step has a policy here.

Caching: ``split`` is a pure function of its inputs and may be answered from KFP's cache.
``ingest`` is not cached by default: it lists the source bucket (KFP's cache key holds
the *string* ``source``, not the objects under it, so a cached ingest would never see new images),
reads the production record for the new-data check and records the dataset, so a cached result
would be stale on exactly the runs that matter (scheduled retraining). ``cache_ingest=True``
(``--cache-ingest``) is for immutable, versioned source prefixes. ``train`` (a retrain is the point
of running), ``evaluate``, ``gate`` and ``promote`` (side effects: the bucket, the
InferenceService) never use the cache. A run submitted with ``--no-cache`` runs every step.
"""

from __future__ import annotations

import argparse
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, replace
from typing import Any

from kfp import kubernetes
from kfp.dsl import PipelineTask
from kfp.dsl.pipeline_context import Pipeline

from brainmri.inference_service import ServingPolicy
from brainmri.pod_security import MINIO_CLIENT_LABEL, RUN_AS_USER
from brainmri.tracking import TRACKING_URI_ENV
from components import COMPONENT_IMAGE, SERVING_IMAGE

DEFAULT_SERVING_IMAGE = SERVING_IMAGE
# the in-cluster MinIO of manifests/base (Service `minio` in namespace `brain-mri`)
DEFAULT_S3_ENDPOINT = "minio.brain-mri.svc.cluster.local:9000"
# the Secret that manifests/base generates from credentials/pipeline.env (the pipeline's MinIO user)
DEFAULT_S3_SECRET = "minio-credentials"
S3_CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
# the Secret ingest reads DICOM settings from, each key optional (a run without DICOM needs none)
DEFAULT_DICOM_SECRET = "brain-mri-dicom"
DICOM_SECRET_KEYS = ("BRAINMRI_ID_SALT", "DICOMWEB_USERNAME", "DICOMWEB_PASSWORD", "DICOMWEB_TOKEN")
GPU_STEP = "train"
INGEST_STEP = "ingest"


@dataclass(frozen=True)
class Resources:
    """Kubernetes requests and limits of one step's container (``None``: not set)."""

    cpu_request: str | None = None
    cpu_limit: str | None = None
    memory_request: str | None = None
    memory_limit: str | None = None


@dataclass(frozen=True)
class StepPolicy:
    """How one step runs on a cluster."""

    resources: Resources
    uses_object_storage: bool = False  # credentials, endpoint and retries
    cache: bool = False
    tracks_experiments: bool = False  # gets MLFLOW_TRACKING_URI when the pipeline has one


@dataclass(frozen=True)
class Toleration:
    """A pod toleration (``kfp.kubernetes.add_toleration``)."""

    key: str
    operator: str = "Exists"
    value: str | None = None
    effect: str | None = "NoSchedule"


STEP_POLICIES: dict[str, StepPolicy] = {
    "ingest": StepPolicy(Resources("500m", "2", "1Gi", "4Gi"), uses_object_storage=True),
    "split": StepPolicy(Resources("250m", "1", "512Mi", "2Gi"), cache=True),
    # train saves a checkpoint to MinIO every epoch (and resumes from it when retried)
    "train": StepPolicy(
        Resources("2", "8", "4Gi", "16Gi"), uses_object_storage=True, tracks_experiments=True
    ),
    "evaluate": StepPolicy(Resources("1", "4", "2Gi", "8Gi"), tracks_experiments=True),
    # gate downloads the production model and scores it on the test split
    "gate": StepPolicy(
        Resources("1", "4", "2Gi", "8Gi"), uses_object_storage=True, tracks_experiments=True
    ),
    "promote": StepPolicy(
        Resources("250m", "1", "1Gi", "2Gi"), uses_object_storage=True, tracks_experiments=True
    ),
}


def _option(default: Any = MISSING, help: str = "", **flag: Any) -> Any:  # noqa: A002
    """A :class:`ClusterOptions` field that is also a command-line flag (:func:`add_cluster_flags`).

    ``flag``: ``name`` (instead of the field's), ``choices``, ``repeat`` (the flag may be given
    several times; the field gets the list, converted by ``convert``), ``convert`` (the flag's
    text -> the field's value), ``default_factory``.
    """
    factory = flag.pop("default_factory", MISSING)
    metadata = {"help": help, **flag}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _resources_of(items: list[str]) -> dict[str, dict[str, str]]:
    """``["train:memory_limit=32Gi,cpu_limit=16", ...]`` -> ``{"train": {...}}``."""
    result: dict[str, dict[str, str]] = {}
    for item in items:
        step, sep, pairs = item.partition(":")
        if not sep:
            raise ValueError(f"--resources {item!r}: expected STEP:KEY=VALUE[,KEY=VALUE]")
        values = parse_key_values(pairs.split(","), f"--resources {step}")
        unknown = set(values) - {f.name for f in fields(Resources)}
        if unknown:
            raise ValueError(f"--resources {step}: unknown {', '.join(sorted(unknown))}")
        result.setdefault(step, {}).update(values)
    return result


@dataclass(frozen=True)
class ClusterOptions:
    """Everything about a cluster that is fixed when the pipeline is compiled; every field with
    a help text is a flag of ``python -m pipelines compile|upload|run|schedule``.

    The defaults fit ``manifests/base``: MinIO at ``DEFAULT_S3_ENDPOINT`` with its credentials in
    the Secret ``minio-credentials``, no GPU. With ``gpu=True``
    ``train`` asks for one ``nvidia.com/gpu``, runs on nodes labelled
    ``nvidia.com/gpu.present=true`` and tolerates the ``nvidia.com/gpu`` taint.
    """

    component_image: str = _option(COMPONENT_IMAGE, "component image", name="image")
    serving_image: str = _option(
        DEFAULT_SERVING_IMAGE,
        "default of the serving_image parameter",
        name="default-serving-image",
    )
    allowed_serving_images: tuple[str, ...] = _option(
        help="an image the serving_image parameter may name (repeat; default: only the "
        "default serving image); a run asking for another fails before anything is deployed",
        name="allowed-serving-image",
        repeat=True,
        convert=tuple,
        default_factory=tuple,
    )
    serving_deployment_mode: str | None = _option(
        None,
        "KServe deployment mode of the InferenceService (the cluster's default when unset)",
        choices=["RawDeployment", "Serverless"],
    )
    serving_min_replicas: int = _option(1, "fewest predictor replicas")
    serving_max_replicas: int = _option(3, "most predictor replicas")
    serving_gpu: bool = _option(
        False, "one GPU per predictor replica (with the GPU node selector and tolerations)"
    )
    image_pull_policy: str | None = _option(
        None, "Kubernetes' default when unset", choices=["Always", "IfNotPresent", "Never"]
    )
    gpu: bool = _option(False, "train on a GPU node (accelerator, node selector, tolerations)")
    accelerator_type: str = _option("nvidia.com/gpu", "the GPU step's accelerator")
    accelerator_limit: int = _option(1, "accelerators of the GPU step")
    gpu_node_selector: Mapping[str, str] = _option(
        help="node label KEY=VALUE for the GPU step (repeat; replaces the default)",
        name="node-selector",
        repeat=True,
        convert=lambda items: parse_key_values(items, "node selector"),
        default_factory=lambda: {"nvidia.com/gpu.present": "true"},
    )
    gpu_tolerations: tuple[Toleration, ...] = _option(
        (Toleration("nvidia.com/gpu"),),
        "toleration KEY[=VALUE][:EFFECT] for the GPU step (repeat; replaces the default)",
        name="toleration",
        repeat=True,
        convert=lambda items: tuple(parse_toleration(t) for t in items),
    )
    retries: int = _option(3, "retries of the object-storage steps (0: none)")
    retry_backoff: str = _option("30s", "first retry delay, multiplied by the factor each time")
    retry_backoff_factor: float = _option(2.0, "growth of the retry delay")
    retry_backoff_max: str = _option("600s", "longest retry delay")
    s3_secret: str | None = _option(
        DEFAULT_S3_SECRET,
        "Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY ('' for none)",
        convert=lambda text: text or None,
    )
    s3_endpoint: str | None = _option(
        DEFAULT_S3_ENDPOINT, "S3 endpoint of the steps", convert=lambda text: text or None
    )
    s3_use_https: bool = _option(False, "TLS to S3", name="s3-https")
    s3_region: str | None = _option("us-east-1", "S3 region", convert=lambda text: text or None)
    dicom_secret: str | None = _option(
        DEFAULT_DICOM_SECRET,
        "Secret with ingest's BRAINMRI_ID_SALT (the salt of DICOM identifier hashes) and PACS "
        "credentials DICOMWEB_USERNAME/DICOMWEB_PASSWORD or DICOMWEB_TOKEN, each optional ('' "
        "for none)",
        convert=lambda text: text or None,
    )
    mlflow_tracking_uri: str | None = _option(
        None,
        "MLflow tracking server of train, evaluate, gate and promote (their MLFLOW_TRACKING_URI;"
        " unset: nothing is tracked)",
        convert=lambda text: text or None,
    )
    cache_ingest: bool = _option(
        False,
        "let KFP reuse a cached ingest (only for an immutable source prefix, never with the "
        "new-data check; see the module doc)",
    )
    in_cluster: bool = True  # False: the kfp.local build (no cluster-only settings)
    steps: Mapping[str, StepPolicy] = _option(
        help="requests/limits of a step, STEP:KEY=VALUE[,KEY=VALUE] with KEY one of "
        "cpu_request, cpu_limit, memory_request, memory_limit (repeat): "
        "train:memory_limit=32Gi,cpu_limit=16",
        name="resources",
        repeat=True,
        convert=_resources_of,
        default_factory=lambda: dict(STEP_POLICIES),
    )

    @classmethod
    def for_local(cls) -> ClusterOptions:
        """For ``kfp.local``: object storage settings come from this process's environment
        (kfp.local applies a container's env), no retries (kfp.local honours them, and a wrong
        source would fail only after minutes of backoff), no requests/limits (ignored there)."""
        steps = {name: replace(p, resources=Resources()) for name, p in STEP_POLICIES.items()}
        return cls(
            s3_secret=None,
            s3_endpoint=None,
            s3_region=None,
            retries=0,
            steps=steps,
            in_cluster=False,
        )

    def with_resources(self, step: str, **changes: str) -> ClusterOptions:
        """A copy whose ``step`` has other requests/limits (``cpu_limit="16"``, ...)."""
        if step not in self.steps:
            raise ValueError(f"unknown step {step!r}; steps: {', '.join(self.steps)}")
        policy = self.steps[step]
        steps = dict(self.steps)
        steps[step] = replace(policy, resources=replace(policy.resources, **changes))
        return replace(self, steps=steps)

    def serving_policy(self) -> ServingPolicy:
        """How promote deploys the InferenceService (a constant of the compiled pipeline)."""
        gpu = self.serving_gpu
        return ServingPolicy(
            allowed_images=self.allowed_serving_images or (self.serving_image,),
            deployment_mode=self.serving_deployment_mode,
            min_replicas=self.serving_min_replicas,
            max_replicas=self.serving_max_replicas,
            gpus=self.accelerator_limit if gpu else 0,
            node_selector=tuple(sorted(self.gpu_node_selector.items())) if gpu else (),
            tolerations=tuple((t.key, t.effect or "NoSchedule") for t in self.gpu_tolerations)
            if gpu
            else (),
        )

    def s3_env(self) -> dict[str, str]:
        """Plain environment variables for steps that use object storage."""
        if self.s3_endpoint is None:
            return {}
        env = {"S3_ENDPOINT": self.s3_endpoint, "S3_USE_HTTPS": "1" if self.s3_use_https else "0"}
        if self.s3_region:
            env["S3_REGION"] = self.s3_region
        return env


def _flag_fields() -> list[Field]:
    return [f for f in fields(ClusterOptions) if "help" in f.metadata]


def _dest(item: Field) -> str:
    return f"cluster_{item.name}"  # apart from the pipeline parameters' names


def flag_of(item: Field) -> str:
    return f"--{item.metadata.get('name', item.name.replace('_', '-'))}"


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`ClusterOptions` field with a help text; a flag left out keeps the
    field's default (and is absent from the parsed namespace)."""
    group = parser.add_argument_group("cluster options (compile time)")
    defaults = ClusterOptions()
    kinds = typing.get_type_hints(ClusterOptions)
    for item in _flag_fields():
        meta, kind = item.metadata, kinds[item.name]
        default = getattr(defaults, item.name)
        shown = "" if meta.get("repeat") else f" (default: {default})"
        options: dict[str, Any] = {"dest": _dest(item), "default": argparse.SUPPRESS}
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif meta.get("repeat"):
            options.update(action="append", metavar="VALUE")
        else:
            options["type"] = kind if kind in (int, float) else str
            options["metavar"] = {int: "N", float: "X"}.get(kind, "TEXT")
        if "choices" in meta:
            options["choices"] = meta["choices"]
        group.add_argument(flag_of(item), help=f"{meta['help']}{shown}", **options)


def cluster_flags_given(args: dict[str, Any]) -> list[str]:
    """The cluster flags present in parsed ``args``, as typed (for messages)."""
    return sorted(flag_of(f) for f in _flag_fields() if _dest(f) in args)


def options_from_flags(args: dict[str, Any]) -> ClusterOptions:
    """``ClusterOptions`` from the cluster flags present in ``args`` (taken out of it)."""
    options = ClusterOptions()
    for item in _flag_fields():
        if _dest(item) not in args:
            continue
        raw = args.pop(_dest(item))
        value = item.metadata.get("convert", lambda v: v)(raw)
        if item.name == "steps":
            for step, values in value.items():
                options = options.with_resources(step, **values)
        else:
            options = replace(options, **{item.name: value})
    return options


def configure_task(task: PipelineTask, options: ClusterOptions) -> PipelineTask:
    """Apply the image, resources, GPU, retries, caching and secrets of ``task``'s step."""
    step = task.component_spec.name
    policy = options.steps.get(step)
    if policy is None:
        raise ValueError(
            f"pipeline step {step!r} has no StepPolicy: add one to STEP_POLICIES in "
            "pipelines/cluster.py (resources, object storage use, caching)"
        )
    task.set_container_image(options.component_image)
    if options.in_cluster:
        # the image's own user; KFP adds the rest of the restricted context (no escalation,
        # capabilities dropped, RuntimeDefault seccomp)
        kubernetes.set_security_context(
            task, run_as_user=RUN_AS_USER, run_as_group=RUN_AS_USER, run_as_non_root=True
        )
    if options.image_pull_policy:
        kubernetes.set_image_pull_policy(task, options.image_pull_policy)
    _set_resources(task, policy.resources)
    cache = policy.cache or (step == INGEST_STEP and options.cache_ingest)
    task.set_caching_options(enable_caching=cache)
    if policy.uses_object_storage:
        if options.retries > 0:
            task.set_retry(
                num_retries=options.retries,
                backoff_duration=options.retry_backoff,
                backoff_factor=options.retry_backoff_factor,
                backoff_max_duration=options.retry_backoff_max,
            )
        if options.in_cluster:  # what manifests/base/networkpolicy.yaml lets reach MinIO
            kubernetes.add_pod_label(task, label_key=MINIO_CLIENT_LABEL, label_value="true")
        if options.s3_secret:
            kubernetes.use_secret_as_env(
                task,
                secret_name=options.s3_secret,
                secret_key_to_env={key: key for key in S3_CREDENTIAL_KEYS},
            )
        for name, value in options.s3_env().items():
            task.set_env_variable(name, value)
    if step == INGEST_STEP and options.dicom_secret and options.in_cluster:
        kubernetes.use_secret_as_env(
            task,
            secret_name=options.dicom_secret,
            secret_key_to_env={key: key for key in DICOM_SECRET_KEYS},
            optional=True,
        )
    if policy.tracks_experiments and options.mlflow_tracking_uri:
        task.set_env_variable(TRACKING_URI_ENV, options.mlflow_tracking_uri)
    if step == GPU_STEP and options.in_cluster:
        # a multi-worker train step starts its PyTorchJob replicas from this same image
        task.set_env_variable("COMPONENT_IMAGE", options.component_image)
    if step == GPU_STEP and options.gpu:
        _request_gpu(task, options)
    return task


def apply_cluster_options(options: ClusterOptions) -> None:
    """Configure every task of the pipeline being defined; call it last in the pipeline function."""
    pipeline = Pipeline.get_default_pipeline()
    if pipeline is None:
        raise RuntimeError("apply_cluster_options() must be called inside a @dsl.pipeline function")
    for task in pipeline.tasks.values():
        configure_task(task, options)


def _set_resources(task: PipelineTask, resources: Resources) -> None:
    if resources.cpu_request:
        task.set_cpu_request(resources.cpu_request)
    if resources.cpu_limit:
        task.set_cpu_limit(resources.cpu_limit)
    if resources.memory_request:
        task.set_memory_request(resources.memory_request)
    if resources.memory_limit:
        task.set_memory_limit(resources.memory_limit)


def _request_gpu(task: PipelineTask, options: ClusterOptions) -> None:
    task.set_accelerator_type(options.accelerator_type)
    task.set_accelerator_limit(options.accelerator_limit)
    for key, value in options.gpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    for toleration in options.gpu_tolerations:
        kubernetes.add_toleration(
            task,
            key=toleration.key,
            operator=toleration.operator,
            value=toleration.value,
            effect=toleration.effect,
        )


def parse_toleration(text: str) -> Toleration:
    """``KEY[=VALUE][:EFFECT]``: ``nvidia.com/gpu:NoSchedule``, ``dedicated=ml:NoExecute``."""
    spec, _, effect = text.partition(":")
    key, has_value, value = spec.partition("=")
    if not key:
        raise ValueError(f"toleration {text!r}: expected KEY[=VALUE][:EFFECT]")
    return Toleration(
        key=key,
        operator="Equal" if has_value else "Exists",
        value=value if has_value else None,
        effect=effect or None,
    )


def parse_key_values(items: Iterable[str], what: str) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; a malformed item is an error naming ``what``."""
    result = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} {item!r}: expected KEY=VALUE")
        result[key] = value
    return result

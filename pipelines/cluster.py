"""Compile-time options for running the DAG on a Kubernetes cluster, and the code that applies them.

Every step of the pipeline has a :class:`StepPolicy` in :data:`STEP_POLICIES`: whether it reads or
writes object storage (then it gets the MinIO credentials from a Kubernetes Secret, the endpoint,
and retries with exponential backoff), whether KFP may reuse a cached result, and its CPU/memory
requests and limits. :class:`ClusterOptions` adds what differs between clusters: images, GPU
scheduling for ``train``, the Secret's name, the S3 endpoint. ``apply_cluster_options`` is called
at the end of the pipeline function and configures every task it created, so a new step cannot be
left unconfigured: the pipeline refuses to build until the step has a policy here.

Caching: ``split`` and ``augment`` are pure functions of their inputs and may be answered from
KFP's cache. ``ingest`` is not cached by default: it lists the source bucket (KFP's cache key holds
the *string* ``source``, not the objects under it, so a cached ingest would never see new images),
reads the production record for the new-data check and records the dataset, so a cached result
would be stale on exactly the runs that matter (scheduled retraining). ``cache_ingest=True``
(``--cache-ingest``) is for immutable, versioned source prefixes. ``train`` (a retrain is the point
of running), ``evaluate``, ``gate`` and ``promote`` (side effects: the bucket, the
InferenceService) never use the cache. A run submitted with ``--no-cache`` runs every step.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from kfp import kubernetes
from kfp.dsl import PipelineTask
from kfp.dsl.pipeline_context import Pipeline

from components import COMPONENT_IMAGE

DEFAULT_SERVING_IMAGE = "ghcr.io/brain-mri-mlops/predictor:0.1.0"
# the in-cluster MinIO of manifests/base (Service `minio` in namespace `brain-mri`)
DEFAULT_S3_ENDPOINT = "minio.brain-mri.svc.cluster.local:9000"
# the Secret that manifests/base generates from minio.env
DEFAULT_S3_SECRET = "minio-credentials"
S3_CREDENTIAL_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
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
    "augment": StepPolicy(Resources("100m", "500m", "512Mi", "1Gi"), cache=True),
    # train saves a checkpoint to MinIO every epoch (and resumes from it when retried)
    "train": StepPolicy(Resources("2", "8", "4Gi", "16Gi"), uses_object_storage=True),
    "evaluate": StepPolicy(Resources("1", "4", "2Gi", "8Gi")),
    # gate downloads the production model and scores it on the test split
    "gate": StepPolicy(Resources("1", "4", "2Gi", "8Gi"), uses_object_storage=True),
    "promote": StepPolicy(Resources("250m", "1", "1Gi", "2Gi"), uses_object_storage=True),
}


@dataclass(frozen=True)
class ClusterOptions:
    """Everything about a cluster that is fixed when the pipeline is compiled.

    The defaults fit ``manifests/base``: MinIO at ``DEFAULT_S3_ENDPOINT`` with its credentials in
    the Secret ``minio-credentials``, no GPU. ``gpu=True`` matches ``manifests/overlays/gpu``:
    ``train`` asks for one ``nvidia.com/gpu``, runs on nodes labelled
    ``nvidia.com/gpu.present=true`` and tolerates the ``nvidia.com/gpu`` taint.
    """

    component_image: str = COMPONENT_IMAGE
    serving_image: str = DEFAULT_SERVING_IMAGE  # the default of the `serving_image` parameter
    image_pull_policy: str | None = None  # Always / IfNotPresent / Never; None: Kubernetes' default
    gpu: bool = False
    accelerator_type: str = "nvidia.com/gpu"
    accelerator_limit: int = 1
    gpu_node_selector: Mapping[str, str] = field(
        default_factory=lambda: {"nvidia.com/gpu.present": "true"}
    )
    gpu_tolerations: tuple[Toleration, ...] = (Toleration("nvidia.com/gpu"),)
    retries: int = 3
    retry_backoff: str = "30s"  # first wait; doubled (backoff_factor) up to retry_backoff_max
    retry_backoff_factor: float = 2.0
    retry_backoff_max: str = "600s"
    s3_secret: str | None = DEFAULT_S3_SECRET  # None: no credentials from a Secret
    s3_endpoint: str | None = DEFAULT_S3_ENDPOINT  # None: leave S3_* to the environment
    s3_use_https: bool = False
    s3_region: str | None = "us-east-1"
    cache_ingest: bool = False  # only for immutable source prefixes (see the module doc)
    in_cluster: bool = True  # False: the kfp.local build (no cluster-only settings)
    steps: Mapping[str, StepPolicy] = field(default_factory=lambda: dict(STEP_POLICIES))

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

    def s3_env(self) -> dict[str, str]:
        """Plain environment variables for steps that use object storage."""
        if self.s3_endpoint is None:
            return {}
        env = {"S3_ENDPOINT": self.s3_endpoint, "S3_USE_HTTPS": "1" if self.s3_use_https else "0"}
        if self.s3_region:
            env["S3_REGION"] = self.s3_region
        return env


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
        if options.s3_secret:
            kubernetes.use_secret_as_env(
                task,
                secret_name=options.s3_secret,
                secret_key_to_env={key: key for key in S3_CREDENTIAL_KEYS},
            )
        for name, value in options.s3_env().items():
            task.set_env_variable(name, value)
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

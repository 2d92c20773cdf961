"""The KServe InferenceService (``serving.kserve.io/v1beta1``) that serves the classifier:
rendering it, and rolling it out.

The predictor is a custom container. KServe's documented way to have a custom container's
model downloaded is the ``STORAGE_URI`` environment variable on the ``kserve-container``:
the controller then injects the storage-initializer init container, which fetches the URI
(with the credentials of the service account) into ``/mnt/models``; the server reads the
model from there (``--model_dir``).

:func:`roll_out_inference_service` applies a new spec and waits until KServe reports it Ready;
when it does not within the timeout, or reports a failure, the previous spec is restored so the
cluster keeps serving the model it served before. The API calls themselves are
:mod:`brainmri.kube`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml
from kubernetes import client

from brainmri.kube import (
    DEFAULT_REQUEST_TIMEOUT_S,
    PENDING,
    TIMEOUT,
    AlreadyExists,
    CustomResource,
    KubeApiError,
    Progress,
    poll,
)

INFERENCE_SERVICES = CustomResource(
    "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService", "KServe"
)
CONTAINER_NAME = "kserve-container"  # the name KServe looks for in custom predictors
STORAGE_URI_ENV = "STORAGE_URI"  # triggers the storage initializer for custom containers
MODEL_MOUNT_PATH = "/mnt/models"  # where the storage initializer puts the model
DEFAULT_READY_TIMEOUT_S = 600.0  # how long a rollout may take to report Ready
DEFAULT_POLL_INTERVAL_S = 5.0
READY = "Ready"
# Ready=False with one of these reasons is a rollout still in progress (KServe/Knative report
# them while the new revision's pods start), not a failure: keep waiting.
IN_PROGRESS_REASONS = frozenset(
    {
        "",
        "RevisionMissing",
        "Deploying",
        "MinimumReplicasUnavailable",
        "ReplicaSetUpdated",
        "NewReplicaSetCreated",
        "FoundNewReplicaSet",
        "PredictorConfigurationReady",
    }
)
# status.modelStatus.transitionStatus values that mean the new spec will not load
FAILED_TRANSITIONS = frozenset({"BlockedByFailedLoad", "InvalidSpec"})


class RolloutError(RuntimeError):
    """The new spec did not become Ready; the message says why and what was restored."""


@dataclass(frozen=True)
class InferenceServiceSpec:
    """What to deploy: one custom-container predictor serving one model."""

    name: str
    namespace: str
    storage_uri: str
    image: str
    model_name: str
    service_account: str = "kserve-s3"
    canary_traffic_percent: int | None = None
    cpu_request: str = "500m"
    memory_request: str = "1Gi"
    cpu_limit: str = "2"
    memory_limit: str = "4Gi"
    prometheus_port: int = 8080
    server_args: tuple[str, ...] = ()  # extra ``python -m serving`` flags, e.g. request limits

    def __post_init__(self) -> None:
        pct = self.canary_traffic_percent
        if pct is not None and not 0 <= pct <= 100:
            raise ValueError(f"canary_traffic_percent must be within 0..100, got {pct}")


def render_inference_service(spec: InferenceServiceSpec) -> dict[str, Any]:
    """The full InferenceService manifest for ``spec`` (long: the manifest, as one literal).

    The model server's HTTP port also serves ``/metrics``, so it is the Prometheus port, named
    both in KServe's own annotations (``prometheus.kserve.io/*``) and in the conventional
    ``prometheus.io/*`` ones that annotation-based scrape configs look for. The S3 endpoint and
    credentials come from the service account's Secret (its ``serving.kserve.io/s3-*``
    annotations), which the storage initializer reads.
    """
    port = str(spec.prometheus_port)
    container = {
        "name": CONTAINER_NAME,
        "image": spec.image,
        "args": [
            "--model_name",
            spec.model_name,
            "--model_dir",
            MODEL_MOUNT_PATH,
            "--http_port",
            port,
            *spec.server_args,
        ],
        "env": [{"name": STORAGE_URI_ENV, "value": spec.storage_uri}],
        "ports": [{"containerPort": spec.prometheus_port, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", "port": spec.prometheus_port},
            "periodSeconds": 5,
        },
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": spec.prometheus_port},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "resources": {
            "requests": {"cpu": spec.cpu_request, "memory": spec.memory_request},
            "limits": {"cpu": spec.cpu_limit, "memory": spec.memory_limit},
        },
    }
    predictor: dict[str, Any] = {
        "serviceAccountName": spec.service_account,
        "containers": [container],
    }
    if spec.canary_traffic_percent is not None:
        predictor["canaryTrafficPercent"] = spec.canary_traffic_percent
    return {
        "apiVersion": INFERENCE_SERVICES.api_version,
        "kind": INFERENCE_SERVICES.kind,
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "annotations": {
                "serving.kserve.io/enable-prometheus-scraping": "true",
                "prometheus.kserve.io/port": port,
                "prometheus.kserve.io/path": "/metrics",
                "prometheus.io/scrape": "true",
                "prometheus.io/port": port,
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": {"predictor": predictor},
    }


def to_yaml(manifest: dict[str, Any]) -> str:
    """``manifest`` as a YAML document, keys in the order they were built."""
    return yaml.safe_dump(manifest, sort_keys=False)


def apply_inference_service(
    manifest: dict[str, Any],
    api_client: client.ApiClient,
    *,
    timeout: tuple[float, float] = DEFAULT_REQUEST_TIMEOUT_S,
) -> tuple[str, dict[str, Any]]:
    """Create the InferenceService, or merge-patch it if it exists.

    Returns ``"created"`` or ``"patched"`` and the object as the server stored it. A patch also
    clears ``canaryTrafficPercent`` when the manifest has none, so re-applying a plain spec ends
    a canary rollout.
    """
    try:
        return "created", INFERENCE_SERVICES.create(api_client, manifest, timeout)
    except AlreadyExists:
        pass
    meta = manifest["metadata"]
    patch = {**manifest, "spec": {**manifest["spec"]}}
    patch["spec"]["predictor"] = {"canaryTrafficPercent": None, **manifest["spec"]["predictor"]}
    stored = INFERENCE_SERVICES.patch(
        api_client, meta["namespace"], meta["name"], patch, timeout, action="apply"
    )
    return "patched", stored


# -- rollout: apply, wait for Ready, roll back ------------------------------------------------
@dataclass(frozen=True)
class Rollout:
    """A rollout that became Ready."""

    action: str  # "created" or "patched"
    detail: str  # the Ready condition that ended the wait


def ready_condition(isvc: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``Ready`` condition of an InferenceService's status, if it has one."""
    conditions = ((isvc or {}).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if isinstance(c, dict) and c.get("type") == READY), None)


def describe_condition(condition: dict[str, Any] | None) -> str:
    if condition is None:
        return "no Ready condition yet"
    text = f"Ready={condition.get('status', 'Unknown')}"
    if condition.get("reason"):
        text += f" ({condition['reason']})"
    if condition.get("message"):
        text += f": {condition['message']}"
    return text


def storage_uri_of(isvc: dict[str, Any] | None) -> str | None:
    """The ``STORAGE_URI`` of the predictor's ``kserve-container``, if any."""
    predictor = ((isvc or {}).get("spec") or {}).get("predictor") or {}
    for container in predictor.get("containers") or []:
        if container.get("name") == CONTAINER_NAME:
            for env in container.get("env") or []:
                if env.get("name") == STORAGE_URI_ENV:
                    return env.get("value")
    return None


class RolloutWatch:
    """Tells whether the InferenceService reports the spec we just applied as Ready.

    A status can be stale: right after a patch it still describes the previous spec. On a real
    API server ``metadata.generation`` grows with every spec change and KServe reports the
    generation it acted on as ``status.observedGeneration``; a status counts once that reaches
    the generation our create/patch returned. Where either number is missing (an emulator, or a
    controller that does not report it), the ``Ready`` condition counts once it has differed from
    the one seen before the apply (status, reason, message or lastTransitionTime) at any look:
    a Ready=True that never changed is not trusted, and the wait runs into its timeout, which
    rolls back - the safe side.

    Ready=False counts as a failure (no more waiting) when its reason is not one of
    :data:`IN_PROGRESS_REASONS`, and so does a ``status.modelStatus.transitionStatus`` of
    :data:`FAILED_TRANSITIONS`.
    """

    def __init__(
        self, generation: int | None, baseline: dict[str, Any] | None, *, created: bool = False
    ) -> None:
        self.generation = generation
        self.baseline = _condition_key(baseline)
        self.changed = created  # a status of an object we just created can only be about it

    def assess(self, isvc: dict[str, Any] | None) -> Progress:
        if isvc is None:
            return Progress("failed", f"the {INFERENCE_SERVICES.kind} was deleted while waiting")
        status = isvc.get("status") or {}
        condition = ready_condition(isvc)
        observed = status.get("observedGeneration")
        if self.generation is not None and isinstance(observed, int):
            if observed < self.generation:
                return Progress(
                    PENDING,
                    f"the controller has not acted on generation {self.generation} yet "
                    f"(observedGeneration {observed})",
                )
            current = True
        else:
            self.changed = self.changed or _condition_key(condition) != self.baseline
            current = self.changed
        if not current:
            return Progress(
                PENDING, f"no status for the new spec yet (still {describe_condition(condition)})"
            )
        model_status = status.get("modelStatus") or {}
        if model_status.get("transitionStatus") in FAILED_TRANSITIONS:
            failure = model_status.get("lastFailureInfo") or {}
            why = ": ".join(str(failure[k]) for k in ("reason", "message") if failure.get(k))
            return Progress(
                "failed", f"model {model_status['transitionStatus']}: {why}".rstrip(": ")
            )
        if condition is None:
            return Progress(PENDING, describe_condition(None))
        if condition.get("status") == "True":
            return Progress("ready", describe_condition(condition))
        if (
            condition.get("status") == "False"
            and (condition.get("reason") or "") not in IN_PROGRESS_REASONS
        ):
            return Progress("failed", describe_condition(condition))
        return Progress(PENDING, describe_condition(condition))


def _condition_key(condition: dict[str, Any] | None) -> tuple | None:
    if condition is None:
        return None
    return tuple(condition.get(k) for k in ("status", "reason", "message", "lastTransitionTime"))


def wait_until_ready(
    name: str,
    namespace: str,
    api_client: client.ApiClient,
    watch: RolloutWatch,
    *,
    timeout_s: float,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    request_timeout: tuple[float, float] = DEFAULT_REQUEST_TIMEOUT_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Progress:
    """Poll the InferenceService until ``watch`` calls it ready or failed, or time runs out."""
    return poll(
        lambda: watch.assess(INFERENCE_SERVICES.get(api_client, namespace, name, request_timeout)),
        timeout_s=timeout_s,
        interval_s=poll_interval_s,
        clock=clock,
        sleep=sleep,
    )


def roll_out_inference_service(
    manifest: dict[str, Any],
    api_client: client.ApiClient,
    *,
    timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    request_timeout: tuple[float, float] = DEFAULT_REQUEST_TIMEOUT_S,
) -> Rollout:
    """Create or patch the InferenceService and wait until it reports the new spec Ready.

    On a failure or timeout the previous spec (``spec``, and the ``annotations`` and ``labels``
    of ``metadata``) is patched back, and :class:`RolloutError` says why and what was restored.
    An InferenceService this call created is left in place when it never became Ready: nothing
    was served from it before, its status shows why it failed, and the next rollout patches it
    (the pipeline's Role does not grant ``delete``, on purpose).
    """
    meta = manifest["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    where = INFERENCE_SERVICES.describe(namespace, name)
    previous = INFERENCE_SERVICES.get(api_client, namespace, name, request_timeout)
    action, stored = apply_inference_service(manifest, api_client, timeout=request_timeout)
    generation = (stored.get("metadata") or {}).get("generation")
    watch = RolloutWatch(
        generation if isinstance(generation, int) else None,
        ready_condition(previous),
        created=previous is None,
    )
    outcome = wait_until_ready(
        name,
        namespace,
        api_client,
        watch,
        timeout_s=timeout_s,
        poll_interval_s=poll_interval_s,
        request_timeout=request_timeout,
    )
    if outcome.state == "ready":
        return Rollout(action, outcome.detail)
    if outcome.state == TIMEOUT:
        problem = (
            f"{where} did not become Ready within {timeout_s:g}s (last seen: {outcome.detail})"
        )
    else:
        problem = f"{where} failed to roll out: {outcome.detail}"
    if previous is None:
        raise RolloutError(
            f"{problem}. It was created by this rollout and is left in place for inspection "
            f"(kubectl describe inferenceservice -n {namespace} {name}); no model was served "
            "from it before, so no client lost one."
        )
    try:
        _restore(previous, api_client, request_timeout)
    except KubeApiError as err:
        raise RolloutError(
            f"{problem}. Rolling back to the previous spec failed as well: {err}. Restore it by "
            f"hand (its storage URI was {storage_uri_of(previous)})."
        ) from err
    raise RolloutError(
        f"{problem}. Rolled back: the previous spec (storage URI {storage_uri_of(previous)}) "
        "is restored."
    )


def _restore(
    previous: dict[str, Any], api_client: client.ApiClient, timeout: tuple[float, float]
) -> None:
    """Merge-patch the InferenceService back to ``previous``'s spec, annotations and labels."""
    meta = previous["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    current = INFERENCE_SERVICES.get(api_client, namespace, name, timeout)
    if current is None:
        raise KubeApiError(f"{INFERENCE_SERVICES.describe(namespace, name)} no longer exists")
    patch = merge_patch(_restorable(current), _restorable(previous))
    if patch:
        INFERENCE_SERVICES.patch(api_client, namespace, name, patch, timeout, action="restore")


def _restorable(isvc: dict[str, Any]) -> dict[str, Any]:
    meta = isvc.get("metadata") or {}
    return {
        "metadata": {
            "annotations": meta.get("annotations") or {},
            "labels": meta.get("labels") or {},
        },
        "spec": isvc.get("spec") or {},
    }


def merge_patch(current: dict[str, Any], target: dict[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns ``current`` into ``target``.

    Keys only in ``current`` become ``None`` (removed), nested objects are diffed, anything
    else that differs (lists included) is replaced whole.
    """
    patch: dict[str, Any] = {key: None for key in current if key not in target}
    for key, value in target.items():
        old = current.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            nested = merge_patch(old, value)
            if nested:
                patch[key] = nested
        elif key not in current or old != value:
            patch[key] = value
    return patch

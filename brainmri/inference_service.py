"""The KServe InferenceService (``serving.kserve.io/v1beta1``) that serves the classifier.

The predictor is a custom container. KServe's documented way to have a custom container's
model downloaded is the ``STORAGE_URI`` environment variable on the ``kserve-container``:
the controller then injects the storage-initializer init container, which fetches the URI
(with the credentials of the service account) into ``/mnt/models``; the server reads the
model from there (``--model_dir``).

:func:`roll_out_inference_service` applies a new spec and waits until KServe reports it Ready;
when it does not within the timeout, or reports a failure, the previous spec is restored so the
cluster keeps serving the model it served before.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

GROUP = "serving.kserve.io"
VERSION = "v1beta1"
PLURAL = "inferenceservices"
KIND = "InferenceService"
CONTAINER_NAME = "kserve-container"  # the name KServe looks for in custom predictors
STORAGE_URI_ENV = "STORAGE_URI"  # triggers the storage initializer for custom containers
MODEL_MOUNT_PATH = "/mnt/models"  # where the storage initializer puts the model
DEFAULT_TIMEOUT_S: tuple[float, float] = (5.0, 30.0)  # (connect, read) per API request
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


class InferenceServiceError(RuntimeError):
    """The Kubernetes API refused the request or could not be reached; the message says why."""


class RolloutError(InferenceServiceError):
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
    """The full InferenceService manifest for ``spec``.

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
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
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


def _api_error(exc: Exception, api_client: client.ApiClient, action: str) -> InferenceServiceError:
    """Translate a client-side failure into an error that says what to check."""
    host = api_client.configuration.host
    if isinstance(exc, urllib3.exceptions.HTTPError) or (
        isinstance(exc, ApiException) and not exc.status
    ):
        return InferenceServiceError(
            f"cannot reach the Kubernetes API server at {host} to {action}: {exc}. "
            "Check that the cluster is running, that the kubeconfig context (or in-cluster "
            "service account) points at it, and that no proxy or firewall blocks the port."
        )
    assert isinstance(exc, ApiException)
    message = f"Kubernetes API server at {host} refused to {action}: HTTP {exc.status} {exc.reason}"
    if exc.status == 404:
        message += f" (is KServe installed, i.e. does the {PLURAL}.{GROUP} CRD exist?)"
    elif exc.status in (401, 403):
        message += " (check the credentials and RBAC of the kubeconfig user / service account)"
    return InferenceServiceError(message)


def apply_inference_service(
    manifest: dict[str, Any],
    api_client: client.ApiClient,
    *,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT_S,
) -> str:
    """Create the InferenceService, or merge-patch it if it exists.

    Returns ``"created"`` or ``"patched"``. A patch also clears ``canaryTrafficPercent``
    when the manifest has none, so re-applying a plain spec ends a canary rollout.
    """
    return _apply(manifest, api_client, timeout)[0]


def _apply(
    manifest: dict[str, Any], api_client: client.ApiClient, timeout: tuple[float, float]
) -> tuple[str, dict[str, Any]]:
    """:func:`apply_inference_service`, also returning the object as the server stored it."""
    api = client.CustomObjectsApi(api_client)
    meta = manifest["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    try:
        try:
            stored = api.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, manifest, _request_timeout=timeout
            )
            return "created", stored
        except ApiException as exc:
            if exc.status != 409:
                raise
        patch = {**manifest, "spec": {**manifest["spec"]}}
        patch["spec"]["predictor"] = {"canaryTrafficPercent": None, **manifest["spec"]["predictor"]}
        stored = api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, patch, _request_timeout=timeout
        )
        return "patched", stored
    except (ApiException, urllib3.exceptions.HTTPError) as exc:
        raise _api_error(exc, api_client, f"apply {KIND} {namespace}/{name}") from exc


def get_inference_service(
    name: str,
    namespace: str,
    api_client: client.ApiClient,
    *,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT_S,
) -> dict[str, Any] | None:
    """The InferenceService as stored on the server, or ``None`` if it does not exist."""
    api = client.CustomObjectsApi(api_client)
    try:
        return api.get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, _request_timeout=timeout
        )
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise _api_error(exc, api_client, f"read {KIND} {namespace}/{name}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise _api_error(exc, api_client, f"read {KIND} {namespace}/{name}") from exc


# -- rollout: apply, wait for Ready, roll back ------------------------------------------------
@dataclass(frozen=True)
class Readiness:
    """One look at a rollout: ``ready``, ``pending``, ``failed`` or ``timeout``, and why."""

    state: str
    detail: str


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

    def assess(self, isvc: dict[str, Any] | None) -> Readiness:
        if isvc is None:
            return Readiness("failed", f"the {KIND} was deleted while waiting for it")
        status = isvc.get("status") or {}
        condition = ready_condition(isvc)
        observed = status.get("observedGeneration")
        if self.generation is not None and isinstance(observed, int):
            if observed < self.generation:
                return Readiness(
                    "pending",
                    f"the controller has not acted on generation {self.generation} yet "
                    f"(observedGeneration {observed})",
                )
            current = True
        else:
            self.changed = self.changed or _condition_key(condition) != self.baseline
            current = self.changed
        if not current:
            return Readiness(
                "pending", f"no status for the new spec yet (still {describe_condition(condition)})"
            )
        model_status = status.get("modelStatus") or {}
        if model_status.get("transitionStatus") in FAILED_TRANSITIONS:
            failure = model_status.get("lastFailureInfo") or {}
            why = ": ".join(str(failure[k]) for k in ("reason", "message") if failure.get(k))
            return Readiness(
                "failed", f"model {model_status['transitionStatus']}: {why}".rstrip(": ")
            )
        if condition is None:
            return Readiness("pending", describe_condition(None))
        if condition.get("status") == "True":
            return Readiness("ready", describe_condition(condition))
        if (
            condition.get("status") == "False"
            and (condition.get("reason") or "") not in IN_PROGRESS_REASONS
        ):
            return Readiness("failed", describe_condition(condition))
        return Readiness("pending", describe_condition(condition))


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
    request_timeout: tuple[float, float] = DEFAULT_TIMEOUT_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Readiness:
    """Poll the InferenceService until ``watch`` calls it ready or failed, or time runs out.

    An API error while polling is not a verdict on the rollout: polling goes on, and the error
    is reported if the wait times out.
    """
    deadline = clock() + timeout_s
    while True:
        try:
            seen = watch.assess(
                get_inference_service(name, namespace, api_client, timeout=request_timeout)
            )
        except InferenceServiceError as err:
            seen = Readiness("pending", f"last poll failed: {err}")
        if seen.state != "pending":
            return seen
        left = deadline - clock()
        if left <= 0:
            return Readiness("timeout", seen.detail)
        sleep(min(poll_interval_s, left))


def roll_out_inference_service(
    manifest: dict[str, Any],
    api_client: client.ApiClient,
    *,
    timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    request_timeout: tuple[float, float] = DEFAULT_TIMEOUT_S,
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
    where = f"{KIND} {namespace}/{name}"
    previous = get_inference_service(name, namespace, api_client, timeout=request_timeout)
    action, stored = _apply(manifest, api_client, request_timeout)
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
    if outcome.state == "timeout":
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
    except InferenceServiceError as err:
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
    current = get_inference_service(name, namespace, api_client, timeout=timeout)
    if current is None:
        raise InferenceServiceError(f"{KIND} {namespace}/{name} no longer exists")
    patch = merge_patch(_restorable(current), _restorable(previous))
    if not patch:
        return
    try:
        client.CustomObjectsApi(api_client).patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, patch, _request_timeout=timeout
        )
    except (ApiException, urllib3.exceptions.HTTPError) as exc:
        raise _api_error(exc, api_client, f"restore {KIND} {namespace}/{name}") from exc


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


def _kubeconfig_paths() -> list[Path]:
    """Existing kubeconfig files: those in ``KUBECONFIG`` if set, else ``~/.kube/config``."""
    raw = os.environ.get("KUBECONFIG", "")
    candidates = [Path(p).expanduser() for p in raw.split(os.pathsep) if p] or [
        Path.home() / ".kube" / "config"
    ]
    return [p for p in candidates if p.is_file()]


def cluster_api_client() -> client.ApiClient | None:
    """An API client for the current cluster, or ``None`` when no cluster is configured.

    In-cluster service-account config wins; otherwise the kubeconfig named by ``KUBECONFIG``
    (or ``~/.kube/config``) is used, with its current context.
    """
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    except ConfigException:
        pass
    paths = _kubeconfig_paths()
    if not paths:
        return None
    joined = os.pathsep.join(str(p) for p in paths)
    try:
        return config.new_client_from_config(config_file=joined)
    except ConfigException as exc:
        raise InferenceServiceError(f"kubeconfig {joined} is unusable: {exc}") from exc

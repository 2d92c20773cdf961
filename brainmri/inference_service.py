"""The KServe InferenceService (``serving.kserve.io/v1beta1``) that serves the classifier.

The predictor is a custom container. KServe's documented way to have a custom container's
model downloaded is the ``STORAGE_URI`` environment variable on the ``kserve-container``:
the controller then injects the storage-initializer init container, which fetches the URI
(with the credentials of the service account) into ``/mnt/models``; the server reads the
model from there (``--model_dir``).
"""

from __future__ import annotations

import os
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


class InferenceServiceError(RuntimeError):
    """The Kubernetes API refused the request or could not be reached; the message says why."""


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

    def __post_init__(self) -> None:
        pct = self.canary_traffic_percent
        if pct is not None and not 0 <= pct <= 100:
            raise ValueError(f"canary_traffic_percent must be within 0..100, got {pct}")


def render_inference_service(spec: InferenceServiceSpec) -> dict[str, Any]:
    """The full InferenceService manifest for ``spec``.

    The model server's HTTP port also serves ``/metrics``, so it is the Prometheus port.
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
        ],
        "env": [{"name": STORAGE_URI_ENV, "value": spec.storage_uri}],
        "ports": [{"containerPort": spec.prometheus_port, "protocol": "TCP"}],
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
    api = client.CustomObjectsApi(api_client)
    meta = manifest["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    try:
        try:
            api.create_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, manifest, _request_timeout=timeout
            )
            return "created"
        except ApiException as exc:
            if exc.status != 409:
                raise
        patch = {**manifest, "spec": {**manifest["spec"]}}
        patch["spec"]["predictor"] = {"canaryTrafficPercent": None, **manifest["spec"]["predictor"]}
        api.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, patch, _request_timeout=timeout
        )
        return "patched"
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

"""The KServe InferenceService (``serving.kserve.io/v1beta1``) that serves the classifier: what
to deploy, and the manifest that deploys it (rolling it out is :mod:`brainmri.rollout`).

The predictor is a custom container. KServe's documented way to have a custom container's
model downloaded is the ``STORAGE_URI`` environment variable on the ``kserve-container``:
the controller then injects the storage-initializer init container, which fetches the URI
(with the credentials of the service account) into ``/mnt/models``; the server reads the
model from there (``--model_dir``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from brainmri.kube import CustomResource

INFERENCE_SERVICES = CustomResource(
    "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService", "KServe"
)
CONTAINER_NAME = "kserve-container"  # the name KServe looks for in custom predictors
STORAGE_URI_ENV = "STORAGE_URI"  # triggers the storage initializer for custom containers
MODEL_MOUNT_PATH = "/mnt/models"  # where the storage initializer puts the model
DEPLOYMENT_MODE_ANNOTATION = "serving.kserve.io/deploymentMode"


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


def storage_uri_of(isvc: dict[str, Any] | None) -> str | None:
    """The ``STORAGE_URI`` of the predictor's ``kserve-container``, if any."""
    predictor = ((isvc or {}).get("spec") or {}).get("predictor") or {}
    for container in predictor.get("containers") or []:
        if container.get("name") == CONTAINER_NAME:
            for env in container.get("env") or []:
                if env.get("name") == STORAGE_URI_ENV:
                    return env.get("value")
    return None

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
from brainmri.pod_security import (
    container_security_context,
    pod_security_context,
    tmp_mount,
    tmp_volume,
)

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
    memory_limit: str = "2Gi"  # bench-load's peak RSS under hostile load stays well below
    prometheus_port: int = 8080
    server_args: tuple[str, ...] = ()  # extra ``python -m serving`` flags, e.g. request limits
    deployment_mode: str | None = None  # "RawDeployment" or "Serverless"; None: the cluster's
    min_replicas: int = 1
    max_replicas: int = 3
    gpus: int = 0  # nvidia.com/gpu per replica
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[tuple[str, str], ...] = ()  # (key, effect), operator Exists

    def __post_init__(self) -> None:
        pct = self.canary_traffic_percent
        if pct is not None and not 0 <= pct <= 100:
            raise ValueError(f"canary_traffic_percent must be within 0..100, got {pct}")
        if self.deployment_mode not in (None, "RawDeployment", "Serverless"):
            raise ValueError(
                f"deployment_mode {self.deployment_mode!r}: use RawDeployment, Serverless or none"
            )
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(
                f"replicas {self.min_replicas}..{self.max_replicas}: need 1 <= min <= max"
            )


class ImageNotAllowed(ValueError):
    """A run asked for a predictor image outside the compiled allow-list."""


@dataclass(frozen=True)
class ServingPolicy:
    """How the InferenceService is deployed, fixed when the pipeline is compiled (so whoever
    can start a run can pick among ``allowed_images`` but deploy nothing else)."""

    allowed_images: tuple[str, ...]
    deployment_mode: str | None = None
    min_replicas: int = 1
    max_replicas: int = 3
    gpus: int = 0
    node_selector: tuple[tuple[str, str], ...] = ()
    tolerations: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """As a KFP constant (JSON: lists, not tuples)."""
        return {
            "allowed_images": list(self.allowed_images),
            "deployment_mode": self.deployment_mode or "",
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "gpus": self.gpus,
            "node_selector": dict(self.node_selector),
            "tolerations": [list(t) for t in self.tolerations],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingPolicy:
        return cls(
            allowed_images=tuple(data["allowed_images"]),
            deployment_mode=data.get("deployment_mode") or None,
            min_replicas=int(data.get("min_replicas", 1)),
            max_replicas=int(data.get("max_replicas", 3)),
            gpus=int(data.get("gpus", 0)),
            node_selector=tuple(sorted((data.get("node_selector") or {}).items())),
            tolerations=tuple(tuple(t) for t in data.get("tolerations") or ()),
        )

    def spec(
        self, name: str, namespace: str, image: str, canary_traffic_percent: int | None = None
    ) -> InferenceServiceSpec:
        """The InferenceService to deploy ``image`` with; :class:`ImageNotAllowed` (naming
        the allowed ones) when it is not on the list."""
        if image not in self.allowed_images:
            raise ImageNotAllowed(
                f"serving_image {image!r} is not allowed by this pipeline; allowed: "
                f"{list(self.allowed_images)} (recompile with --allowed-serving-image to add one)"
            )
        return InferenceServiceSpec(
            name=name,
            namespace=namespace,
            storage_uri="",
            image=image,
            model_name=name,
            canary_traffic_percent=canary_traffic_percent,
            deployment_mode=self.deployment_mode,
            min_replicas=self.min_replicas,
            max_replicas=self.max_replicas,
            gpus=self.gpus,
            node_selector=self.node_selector,
            tolerations=self.tolerations,
        )


def render_inference_service(spec: InferenceServiceSpec) -> dict[str, Any]:
    """The full InferenceService manifest for ``spec`` (long: the manifest, as one literal).

    The model server's HTTP port also serves ``/metrics``, so it is the Prometheus port, named
    both in KServe's own annotations (``prometheus.kserve.io/*``) and in the conventional
    ``prometheus.io/*`` ones that annotation-based scrape configs look for. The S3 endpoint and
    credentials come from the service account's Secret (its ``serving.kserve.io/s3-*``
    annotations), which the storage initializer reads.
    """
    port = str(spec.prometheus_port)
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": spec.cpu_request, "memory": spec.memory_request},
        "limits": {"cpu": spec.cpu_limit, "memory": spec.memory_limit},
    }
    if spec.gpus:
        for bound in resources.values():
            bound["nvidia.com/gpu"] = spec.gpus
    probe = {"port": spec.prometheus_port}
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
        # the storage initializer's only input; the predictor itself holds no S3 credentials
        "env": [{"name": STORAGE_URI_ENV, "value": spec.storage_uri}],
        "ports": [{"containerPort": spec.prometheus_port, "protocol": "TCP"}],
        # the model loads before the port opens: up to 5 minutes, then liveness takes over
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", **probe},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 60,
        },
        "readinessProbe": {
            "httpGet": {"path": "/v2/health/ready", **probe},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        # answered on the event loop, never behind queued work (serving.limits): a minute of
        # silence, not one slow answer under load, restarts the pod
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", **probe},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "resources": resources,
        "securityContext": container_security_context(),
        "volumeMounts": [tmp_mount()],
    }
    predictor: dict[str, Any] = {
        "serviceAccountName": spec.service_account,
        "minReplicas": spec.min_replicas,
        "maxReplicas": spec.max_replicas,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [tmp_volume()],
    }
    if spec.node_selector:
        predictor["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        predictor["tolerations"] = [
            {"key": key, "operator": "Exists", "effect": effect} for key, effect in spec.tolerations
        ]
    if spec.canary_traffic_percent is not None:
        predictor["canaryTrafficPercent"] = spec.canary_traffic_percent
    annotations = {
        "serving.kserve.io/enable-prometheus-scraping": "true",
        "prometheus.kserve.io/port": port,
        "prometheus.kserve.io/path": "/metrics",
        "prometheus.io/scrape": "true",
        "prometheus.io/port": port,
        "prometheus.io/path": "/metrics",
    }
    if spec.deployment_mode:
        annotations[DEPLOYMENT_MODE_ANNOTATION] = spec.deployment_mode
    return {
        "apiVersion": INFERENCE_SERVICES.api_version,
        "kind": INFERENCE_SERVICES.kind,
        "metadata": {"name": spec.name, "namespace": spec.namespace, "annotations": annotations},
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

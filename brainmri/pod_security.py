"""The security context every pod the project renders runs with: Kubernetes' ``restricted`` Pod
Security Standard (non-root, no privilege escalation, every capability dropped, the runtime's
default seccomp profile) plus a read-only root filesystem, with an ``emptyDir`` on ``/tmp`` as
the only writable place.

The predictor (:mod:`brainmri.inference_service`) and the PyTorchJob replicas
(:mod:`components.train_job`) take their contexts from here; ``manifests/base`` gives MinIO and
the bucket Job the same ones, and ``tests/test_manifests.py`` holds every rendered pod to them.
"""

from __future__ import annotations

from typing import Any

RUN_AS_USER = 1000  # the numeric user of both images (their Dockerfiles' USER 1000:1000)
# the pod label manifests/base/networkpolicy.yaml admits to MinIO's S3 port (pipeline steps,
# PyTorchJob replicas, the setup Job; InferenceService pods go by KServe's own label)
MINIO_CLIENT_LABEL = "brain-mri.kubeflow.org/minio-client"
TMP_VOLUME = "tmp"
TMP_PATH = "/tmp"


def pod_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS_USER,
        "runAsGroup": RUN_AS_USER,
        "fsGroup": RUN_AS_USER,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def tmp_volume(size: str = "1Gi") -> dict[str, Any]:
    """The writable scratch space: an ``emptyDir`` of at most ``size`` on ``/tmp``."""
    return {"name": TMP_VOLUME, "emptyDir": {"sizeLimit": size}}


def tmp_mount() -> dict[str, Any]:
    return {"name": TMP_VOLUME, "mountPath": TMP_PATH}

"""InferenceService rendering and apply, against kmock's in-memory Kubernetes API over real HTTP.

``kube_api`` runs a :class:`kmock.KubernetesEmulator` on its own event loop in a background
thread, so the synchronous ``kubernetes`` client talks to it like to a real API server.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import kmock
import pytest
from kubernetes import client

from brainmri.inference_service import (
    CONTAINER_NAME,
    GROUP,
    MODEL_MOUNT_PATH,
    PLURAL,
    STORAGE_URI_ENV,
    VERSION,
    InferenceServiceError,
    InferenceServiceSpec,
    apply_inference_service,
    cluster_api_client,
    get_inference_service,
    render_inference_service,
    to_yaml,
)
from tests.kube_emulator import KubeApi


def make_spec(**overrides: Any) -> InferenceServiceSpec:
    values: dict[str, Any] = {
        "name": "brain-mri",
        "namespace": "kubeflow-user",
        "storage_uri": "s3://models/brain-mri/v1",
        "image": "registry.local/brain-mri-predictor:0.1.0",
        "model_name": "brain-mri",
    }
    return InferenceServiceSpec(**{**values, **overrides})


def predictor_of(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["predictor"]


def test_render_has_custom_container_storage_resources_and_metrics() -> None:
    manifest = render_inference_service(make_spec(prometheus_port=9090))

    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"] == "brain-mri"
    assert manifest["metadata"]["namespace"] == "kubeflow-user"
    assert manifest["metadata"]["annotations"] == {
        "serving.kserve.io/enable-prometheus-scraping": "true",
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "9090",
        "prometheus.io/path": "/metrics",
    }
    predictor = predictor_of(manifest)
    assert predictor["serviceAccountName"] == "kserve-s3"
    assert "canaryTrafficPercent" not in predictor
    (container,) = predictor["containers"]
    assert container["name"] == CONTAINER_NAME
    assert container["image"] == "registry.local/brain-mri-predictor:0.1.0"
    assert container["args"] == [
        "--model_name",
        "brain-mri",
        "--model_dir",
        MODEL_MOUNT_PATH,
        "--http_port",
        "9090",
    ]
    assert container["env"] == [{"name": STORAGE_URI_ENV, "value": "s3://models/brain-mri/v1"}]
    assert container["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    assert "kind: InferenceService" in to_yaml(manifest)
    assert to_yaml(manifest).index("apiVersion") < to_yaml(manifest).index("spec")


def test_render_canary_and_validation() -> None:
    spec = make_spec(canary_traffic_percent=10)
    assert predictor_of(render_inference_service(spec))["canaryTrafficPercent"] == 10
    with pytest.raises(ValueError, match="0..100"):
        make_spec(canary_traffic_percent=101)


def test_apply_creates_then_patches(kube_api: KubeApi) -> None:
    api_client = kube_api.api_client()
    first = render_inference_service(make_spec())

    assert get_inference_service("brain-mri", "kubeflow-user", api_client) is None
    assert apply_inference_service(first, api_client) == "created"
    assert kube_api.stored("brain-mri", "kubeflow-user") == first

    second = render_inference_service(make_spec(storage_uri="s3://models/brain-mri/v2"))
    assert apply_inference_service(second, api_client) == "patched"
    fetched = get_inference_service("brain-mri", "kubeflow-user", api_client)
    assert fetched is not None
    (container,) = predictor_of(fetched)["containers"]
    assert container["env"] == [{"name": STORAGE_URI_ENV, "value": "s3://models/brain-mri/v2"}]
    assert fetched == second


def test_canary_percent_lands_and_plain_apply_clears_it(kube_api: KubeApi) -> None:
    api_client = kube_api.api_client()
    apply_inference_service(render_inference_service(make_spec()), api_client)

    canary = make_spec(storage_uri="s3://models/brain-mri/v2", canary_traffic_percent=20)
    assert apply_inference_service(render_inference_service(canary), api_client) == "patched"
    stored = kube_api.stored("brain-mri", "kubeflow-user")
    assert predictor_of(stored)["canaryTrafficPercent"] == 20

    promoted = make_spec(storage_uri="s3://models/brain-mri/v2")
    apply_inference_service(render_inference_service(promoted), api_client)
    assert "canaryTrafficPercent" not in predictor_of(kube_api.stored("brain-mri", "kubeflow-user"))


def test_status_set_as_a_controller_would_is_readable(kube_api: KubeApi) -> None:
    """Two ways for status tests to play the KServe controller; both are seen by GET."""
    api_client = kube_api.api_client()
    apply_inference_service(render_inference_service(make_spec()), api_client)

    # 1. Over HTTP, as the controller does: PATCH the status subresource.
    not_ready = [{"type": "Ready", "status": "False", "reason": "RevisionMissing"}]
    client.CustomObjectsApi(api_client).patch_namespaced_custom_object_status(
        GROUP, VERSION, "kubeflow-user", PLURAL, "brain-mri", {"status": {"conditions": not_ready}}
    )
    fetched = get_inference_service("brain-mri", "kubeflow-user", api_client)
    assert fetched is not None
    assert fetched["status"]["conditions"] == not_ready

    # 2. Directly in the emulator's store.
    ready = [{"type": "Ready", "status": "True"}]
    kube_api.set_status("brain-mri", "kubeflow-user", {"conditions": ready})
    fetched = get_inference_service("brain-mri", "kubeflow-user", api_client)
    assert fetched is not None
    assert fetched["status"]["conditions"] == ready
    assert fetched["spec"] == render_inference_service(make_spec())["spec"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_api_server_gives_clear_error_fast() -> None:
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{_closed_port()}"  # default retries: urllib3's 3
    manifest = render_inference_service(make_spec())

    started = time.monotonic()
    with client.ApiClient(configuration) as api_client:
        with pytest.raises(InferenceServiceError) as excinfo:
            apply_inference_service(manifest, api_client, timeout=(2.0, 2.0))
        with pytest.raises(InferenceServiceError, match="cannot reach"):
            get_inference_service("brain-mri", "kubeflow-user", api_client, timeout=(2.0, 2.0))
    assert time.monotonic() - started < 10

    message = str(excinfo.value)
    assert "cannot reach the Kubernetes API server" in message
    assert configuration.host in message
    assert "kubeconfig" in message


def test_api_refusal_names_status(kube_api: KubeApi) -> None:
    """A refusal (here RBAC: 403) becomes an InferenceServiceError with status and reason."""
    forbidden = kmock.KubernetesError(status=403, reason="Forbidden", message="no RBAC")
    kube_api.call(lambda: kube_api.emulator[kmock.action.CREATE] << forbidden)
    with pytest.raises(InferenceServiceError, match=r"HTTP 403 Forbidden .*RBAC"):
        apply_inference_service(render_inference_service(make_spec()), kube_api.api_client())


def test_cluster_api_client_is_none_without_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cluster_api_client() is None

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing.yaml"))
    assert cluster_api_client() is None


def test_cluster_api_client_uses_kubeconfig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:6443'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: test, context: {cluster: c, user: u}}]\n"
    )
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    api_client = cluster_api_client()
    assert api_client is not None
    with api_client:
        assert api_client.configuration.host == "http://127.0.0.1:6443"

"""InferenceService rendering; the Kubernetes API client against the emulated API server (real
HTTP, generation and resourceVersion as a real server keeps them); and its errors."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import kmock
import pytest
from kubernetes import client

from brainmri.inference_service import (
    CONTAINER_NAME,
    INFERENCE_SERVICES,
    MODEL_MOUNT_PATH,
    STORAGE_URI_ENV,
    InferenceServiceSpec,
    render_inference_service,
    to_yaml,
)
from brainmri.kube import Conflict, KubeApiError, cluster_api_client
from brainmri.rollout import apply_inference_service
from tests.kube_emulator import KubeApi

GROUP, VERSION, PLURAL = (
    INFERENCE_SERVICES.group,
    INFERENCE_SERVICES.version,
    INFERENCE_SERVICES.plural,
)


def get_inference_service(
    name: str, namespace: str, api_client: client.ApiClient, **kw: Any
) -> dict[str, Any] | None:
    return INFERENCE_SERVICES.get(api_client, namespace, name, **kw)


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


def test_render_has_custom_container_storage_resources_probes_and_metrics() -> None:
    manifest = render_inference_service(make_spec(prometheus_port=9090))

    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1"
    assert manifest["kind"] == "InferenceService"
    assert manifest["metadata"]["name"] == "brain-mri"
    assert manifest["metadata"]["namespace"] == "kubeflow-user"
    assert manifest["metadata"]["annotations"] == {
        "serving.kserve.io/enable-prometheus-scraping": "true",
        "prometheus.kserve.io/port": "9090",
        "prometheus.kserve.io/path": "/metrics",
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
        "limits": {"cpu": "2", "memory": "2Gi"},
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 9090}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 9090}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["timeoutSeconds"] >= 3, probe  # the default 1 s fails under load
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert predictor["securityContext"]["runAsNonRoot"] is True
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert "kind: InferenceService" in to_yaml(manifest)
    assert to_yaml(manifest).index("apiVersion") < to_yaml(manifest).index("spec")


def test_render_appends_server_args() -> None:
    spec = make_spec(server_args=("--max_batch_size", "16", "--max_payload_bytes", "8000000"))
    (container,) = predictor_of(render_inference_service(spec))["containers"]
    assert container["args"][-4:] == ["--max_batch_size", "16", "--max_payload_bytes", "8000000"]


@pytest.mark.parametrize("canary", [None, 25])
def test_rendered_manifest_matches_the_kserve_crd_schema(canary: int | None) -> None:
    """Strictly, like the API server: an undeclared field (a typo) would fail here."""
    jsonschema = pytest.importorskip("jsonschema")
    from tests.test_manifests import ISVC_SCHEMA, strict_crd_schema

    validator = jsonschema.Draft202012Validator(
        strict_crd_schema(json.loads(ISVC_SCHEMA.read_text()))
    )
    manifest = render_inference_service(
        make_spec(canary_traffic_percent=canary, server_args=("--max_batch_size", "8"))
    )
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(manifest)]
    assert not errors, errors


def test_render_deployment_mode_replicas_and_gpu() -> None:
    spec = make_spec(
        deployment_mode="RawDeployment",
        min_replicas=1,
        max_replicas=1,
        gpus=1,
        node_selector=(("nvidia.com/gpu.present", "true"),),
        tolerations=(("nvidia.com/gpu", "NoSchedule"),),
    )
    manifest = render_inference_service(spec)
    assert (
        manifest["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    )
    predictor = predictor_of(manifest)
    assert (predictor["minReplicas"], predictor["maxReplicas"]) == (1, 1)
    assert predictor["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert predictor["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert predictor["tolerations"][0]["key"] == "nvidia.com/gpu"
    with pytest.raises(ValueError, match="deployment_mode"):
        make_spec(deployment_mode="Knative")
    with pytest.raises(ValueError, match="min <= max"):
        make_spec(min_replicas=3, max_replicas=2)


def test_render_canary_and_validation() -> None:
    spec = make_spec(canary_traffic_percent=10)
    assert predictor_of(render_inference_service(spec))["canaryTrafficPercent"] == 10
    with pytest.raises(ValueError, match="0..100"):
        make_spec(canary_traffic_percent=101)


def test_apply_creates_then_patches(kube_api: KubeApi) -> None:
    api_client = kube_api.api_client()
    first = render_inference_service(make_spec())

    assert get_inference_service("brain-mri", "kubeflow-user", api_client) is None
    action, stored = apply_inference_service(first, api_client)
    assert action == "created" and stored["spec"] == first["spec"]

    second = render_inference_service(make_spec(storage_uri="s3://models/brain-mri/v2"))
    assert apply_inference_service(second, api_client, stored)[0] == "patched"
    fetched = get_inference_service("brain-mri", "kubeflow-user", api_client)
    assert fetched is not None
    (container,) = predictor_of(fetched)["containers"]
    assert container["env"] == [{"name": STORAGE_URI_ENV, "value": "s3://models/brain-mri/v2"}]
    assert fetched["spec"] == second["spec"]


def test_the_api_server_keeps_generation_and_resource_version(kube_api: KubeApi) -> None:
    """As a real one does: generation grows with spec changes only, resourceVersion with every
    write, a write with an older resourceVersion is a 409, the status has its own subresource."""
    api_client = kube_api.api_client()
    _, created = apply_inference_service(render_inference_service(make_spec()), api_client)
    assert created["metadata"]["generation"] == 1 and created["metadata"]["uid"]
    status = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    after_status = client.CustomObjectsApi(api_client).patch_namespaced_custom_object_status(
        GROUP, VERSION, "kubeflow-user", PLURAL, "brain-mri", status
    )
    assert after_status["metadata"]["generation"] == 1  # a status write is not a spec change
    assert int(after_status["metadata"]["resourceVersion"]) > int(
        created["metadata"]["resourceVersion"]
    )
    changed = render_inference_service(make_spec(storage_uri="s3://models/brain-mri/v2"))
    _, patched = apply_inference_service(changed, api_client, after_status)
    assert patched["metadata"]["generation"] == 2
    assert patched["status"] == after_status["status"]  # the object's write kept the status
    with pytest.raises(Conflict, match="409"):  # based on what it read before the last write
        apply_inference_service(changed, api_client, after_status)


def test_canary_percent_lands_and_plain_apply_clears_it(kube_api: KubeApi) -> None:
    api_client = kube_api.api_client()
    _, stored = apply_inference_service(render_inference_service(make_spec()), api_client)

    canary = make_spec(storage_uri="s3://models/brain-mri/v2", canary_traffic_percent=20)
    action, stored = apply_inference_service(render_inference_service(canary), api_client, stored)
    assert action == "patched"
    assert predictor_of(kube_api.stored("brain-mri", "kubeflow-user"))["canaryTrafficPercent"] == 20

    promoted = make_spec(storage_uri="s3://models/brain-mri/v2")
    apply_inference_service(render_inference_service(promoted), api_client, stored)
    assert "canaryTrafficPercent" not in predictor_of(kube_api.stored("brain-mri", "kubeflow-user"))


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
        with pytest.raises(KubeApiError) as excinfo:
            apply_inference_service(manifest, api_client, timeout=(2.0, 2.0))
        with pytest.raises(KubeApiError, match="cannot reach"):
            get_inference_service("brain-mri", "kubeflow-user", api_client, timeout=(2.0, 2.0))
    assert time.monotonic() - started < 10

    message = str(excinfo.value)
    assert "cannot reach the Kubernetes API server" in message
    assert configuration.host in message
    assert "kubeconfig" in message


def test_api_refusal_names_status(kube_api: KubeApi) -> None:
    """A refusal (here RBAC: 403) becomes a KubeApiError with status and reason."""
    forbidden = kmock.KubernetesError(status=403, reason="Forbidden", message="no RBAC")
    kube_api.call(lambda: kube_api.emulator[kmock.action.CREATE] << forbidden)
    with pytest.raises(KubeApiError, match=r"HTTP 403 Forbidden .*RBAC"):
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


def test_inside_a_pod_an_unusable_service_account_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not "no cluster": a promote step in a pod must not skip the rollout and still record."""
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", "443")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(KubeApiError, match="service account is unusable"):
        cluster_api_client()


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

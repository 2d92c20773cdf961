"""InferenceService rendering and apply, against kmock's in-memory Kubernetes API over real HTTP.

``kube_api`` runs a :class:`kmock.KubernetesEmulator` on its own event loop in a background
thread, so the synchronous ``kubernetes`` client talks to it like to a real API server.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import kmock
import pytest
from kubernetes import client

from brainmri import inference_service
from brainmri.inference_service import (
    CONTAINER_NAME,
    INFERENCE_SERVICES,
    MODEL_MOUNT_PATH,
    STORAGE_URI_ENV,
    InferenceServiceSpec,
    Rollout,
    RolloutError,
    RolloutWatch,
    apply_inference_service,
    merge_patch,
    render_inference_service,
    roll_out_inference_service,
    to_yaml,
    wait_until_ready,
)
from brainmri.kube import KubeApiError, Progress, cluster_api_client
from tests.kube_emulator import FakeController, KubeApi

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
        "limits": {"cpu": "2", "memory": "4Gi"},
    }
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 9090}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 9090}
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


def test_render_canary_and_validation() -> None:
    spec = make_spec(canary_traffic_percent=10)
    assert predictor_of(render_inference_service(spec))["canaryTrafficPercent"] == 10
    with pytest.raises(ValueError, match="0..100"):
        make_spec(canary_traffic_percent=101)


def test_apply_creates_then_patches(kube_api: KubeApi) -> None:
    api_client = kube_api.api_client()
    first = render_inference_service(make_spec())

    assert get_inference_service("brain-mri", "kubeflow-user", api_client) is None
    assert apply_inference_service(first, api_client)[0] == "created"
    assert kube_api.stored("brain-mri", "kubeflow-user") == first

    second = render_inference_service(make_spec(storage_uri="s3://models/brain-mri/v2"))
    assert apply_inference_service(second, api_client)[0] == "patched"
    fetched = get_inference_service("brain-mri", "kubeflow-user", api_client)
    assert fetched is not None
    (container,) = predictor_of(fetched)["containers"]
    assert container["env"] == [{"name": STORAGE_URI_ENV, "value": "s3://models/brain-mri/v2"}]
    assert fetched == second


def test_canary_percent_lands_and_plain_apply_clears_it(kube_api: KubeApi) -> None:
    api_client = kube_api.api_client()
    apply_inference_service(render_inference_service(make_spec()), api_client)

    canary = make_spec(storage_uri="s3://models/brain-mri/v2", canary_traffic_percent=20)
    assert apply_inference_service(render_inference_service(canary), api_client)[0] == "patched"
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


# -- readiness of a rollout --------------------------------------------------------------------
def isvc_with(
    ready: dict[str, Any] | None = None,
    *,
    generation: int | None = None,
    observed: int | None = None,
    model_status: dict[str, Any] | None = None,
) -> dict[str, Any]:
    status: dict[str, Any] = {"conditions": [{"type": "Ready", **ready}] if ready else []}
    if observed is not None:
        status["observedGeneration"] = observed
    if model_status is not None:
        status["modelStatus"] = model_status
    meta: dict[str, Any] = {"name": "brain-mri"}
    if generation is not None:
        meta["generation"] = generation
    return {"metadata": meta, "spec": {}, "status": status}


READY_OLD = {"status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
READY_NEW = {"status": "True", "lastTransitionTime": "2026-01-01T00:05:00Z"}


def test_watch_trusts_observed_generation_when_the_server_reports_it() -> None:
    watch = RolloutWatch(generation=3, baseline=READY_OLD)
    stale = watch.assess(isvc_with(READY_OLD, generation=3, observed=2))
    assert stale.state == "pending" and "generation 3" in stale.detail
    assert watch.assess(isvc_with(READY_OLD, generation=3, observed=3)).state == "ready"
    failed = isvc_with({"status": "False", "reason": "RevisionFailed"}, generation=3, observed=3)
    assert watch.assess(failed) == Progress("failed", "Ready=False (RevisionFailed)")


def test_watch_without_generations_needs_a_changed_ready_condition() -> None:
    watch = RolloutWatch(generation=None, baseline=READY_OLD)
    assert watch.assess(isvc_with(READY_OLD)).state == "pending"  # stale: from the old spec
    assert watch.assess(isvc_with({"status": "Unknown", "reason": "Deploying"})).state == "pending"
    assert watch.assess(isvc_with(READY_OLD)).state == "ready"  # changed once: sticky
    assert RolloutWatch(None, READY_OLD).assess(isvc_with(READY_NEW)).state == "ready"
    assert RolloutWatch(None, None, created=True).assess(isvc_with(READY_OLD)).state == "ready"


@pytest.mark.parametrize(
    ("ready", "model_status", "state", "detail"),
    [
        ({"status": "False", "reason": "RevisionMissing"}, None, "pending", "RevisionMissing"),
        ({"status": "False"}, None, "pending", "Ready=False"),
        ({"status": "Unknown"}, None, "pending", "Ready=Unknown"),
        (None, None, "pending", "no Ready condition yet"),
        (
            {"status": "False", "reason": "ProgressDeadlineExceeded", "message": "too slow"},
            None,
            "failed",
            "Ready=False (ProgressDeadlineExceeded): too slow",
        ),
        (
            {"status": "Unknown"},
            {
                "transitionStatus": "BlockedByFailedLoad",
                "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "no model.json"},
            },
            "failed",
            "model BlockedByFailedLoad: ModelLoadFailed: no model.json",
        ),
    ],
    ids=["in-progress-reason", "no-reason", "unknown", "no-condition", "failed", "model-load"],
)
def test_watch_tells_progress_from_failure(
    ready: dict | None, model_status: dict | None, state: str, detail: str
) -> None:
    watch = RolloutWatch(generation=2, baseline=None)
    seen = watch.assess(isvc_with(ready, generation=2, observed=2, model_status=model_status))
    assert seen.state == state and detail in seen.detail


def test_watch_fails_when_the_service_disappears() -> None:
    assert RolloutWatch(None, READY_OLD).assess(None).state == "failed"


def test_wait_keeps_polling_through_api_errors_until_the_deadline() -> None:
    configuration = client.Configuration()
    configuration.host = f"http://127.0.0.1:{_closed_port()}"
    configuration.retries = 0
    now = [0.0]
    with client.ApiClient(configuration) as api_client:
        seen = wait_until_ready(
            "brain-mri",
            "kubeflow-user",
            api_client,
            RolloutWatch(None, READY_OLD),
            timeout_s=10.0,
            poll_interval_s=4.0,
            request_timeout=(1.0, 1.0),
            clock=lambda: now[0],
            sleep=lambda seconds: now.__setitem__(0, now[0] + seconds),
        )
    assert seen.state == "timeout"
    assert "last poll failed" in seen.detail and "cannot reach" in seen.detail
    assert now[0] == 10.0  # slept 4 + 4 + 2, never past the deadline


def test_merge_patch_turns_current_into_target() -> None:
    current = {"spec": {"predictor": {"canaryTrafficPercent": 20, "containers": [1, 2]}}, "x": 1}
    target = {"spec": {"predictor": {"containers": [1]}}, "y": {"z": 2}}
    patch = merge_patch(current, target)
    assert patch == {
        "x": None,
        "spec": {"predictor": {"canaryTrafficPercent": None, "containers": [1]}},
        "y": {"z": 2},
    }
    assert merge_patch(target, target) == {}


def test_rollback_restores_spec_annotations_and_labels(kube_api: KubeApi) -> None:
    api_client = kube_api.api_client()
    previous = render_inference_service(make_spec(server_args=("--max_batch_size", "8")))
    previous["metadata"]["labels"] = {"team": "imaging"}
    apply_inference_service(previous, api_client)
    kube_api.set_status(
        "brain-mri", "kubeflow-user", {"conditions": [{"type": "Ready", **READY_OLD}]}
    )

    broken = render_inference_service(
        make_spec(storage_uri="s3://models/brain-mri/v2", canary_traffic_percent=10)
    )
    broken["metadata"]["annotations"]["added-by-new-spec"] = "yes"
    with pytest.raises(RolloutError) as info:  # nothing ever reports on it: a stale Ready
        roll_out_inference_service(broken, api_client, timeout_s=0.2, poll_interval_s=0.02)
    assert "storage URI s3://models/brain-mri/v1" in str(info.value)
    stored = kube_api.stored("brain-mri", "kubeflow-user")
    assert stored["spec"] == previous["spec"]
    assert stored["metadata"]["annotations"] == previous["metadata"]["annotations"]
    assert stored["metadata"]["labels"] == {"team": "imaging"}


def test_a_failed_rollback_is_reported_with_what_to_restore(
    kube_api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    api_client = kube_api.api_client()
    apply_inference_service(render_inference_service(make_spec()), api_client)

    def refuse(*_args: Any) -> None:
        raise KubeApiError("HTTP 403 Forbidden")

    monkeypatch.setattr(inference_service, "_restore", refuse)
    new = render_inference_service(make_spec(storage_uri="s3://models/brain-mri/v2"))
    with pytest.raises(RolloutError) as info:
        roll_out_inference_service(new, api_client, timeout_s=0.1, poll_interval_s=0.02)
    message = str(info.value)
    assert "Rolling back to the previous spec failed as well: HTTP 403 Forbidden" in message
    assert "its storage URI was s3://models/brain-mri/v1" in message


def test_roll_out_returns_once_ready(kube_api: KubeApi) -> None:
    api_client = kube_api.api_client()
    with FakeController(kube_api, "brain-mri", "kubeflow-user"):
        rollout = roll_out_inference_service(
            render_inference_service(make_spec()), api_client, timeout_s=30, poll_interval_s=0.02
        )
    assert rollout == Rollout("created", "Ready=True")

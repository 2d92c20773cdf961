"""Rolling the InferenceService out: when the new model serves (by KServe's status in each
deployment mode, and by what the predictor answers), the wait, and the rollback rules."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes import client

from brainmri.inference_service import render_inference_service
from brainmri.kube import CustomResource, KubeApiError, Progress
from brainmri.rollout import (
    ConcurrentRollout,
    Rollout,
    RolloutError,
    RolloutWatch,
    Target,
    _restore,
    apply_inference_service,
    merge_patch,
    roll_out_inference_service,
    wait_until_ready,
)
from tests.kube_emulator import FakeKServe, KubeApi, version_of
from tests.test_inference_service import _closed_port, make_spec

NEW = Target("v2", "brain-mri")


def answering(*versions: str):  # noqa: ANN201 - a probe
    """A probe whose answers are ``versions``, then the last one forever."""
    queue = list(versions)

    def probe(_url: str, _name: str) -> str:
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return probe


def raw(ready: str = "True", reason: str = "", **status: Any) -> dict[str, Any]:
    condition = {"type": "Ready", "status": ready, "reason": reason}
    return {
        "metadata": {"name": "brain-mri", "generation": 7},
        "status": {
            "deploymentMode": "RawDeployment",
            "observedGeneration": 2,  # the Deployment's counter, not the ISVC's
            "address": {"url": "http://brain-mri-predictor.ns.svc"},
            "conditions": [condition],
            **status,
        },
    }


def test_raw_ready_means_the_predictor_answers_with_the_new_version() -> None:
    """Ready stays True through a rolling update: the answers decide, several in a row."""
    watch = RolloutWatch(NEW, raw(), answering("v1", "v2", "v2", "v2"))
    still = watch.assess(raw(reason="ReplicaSetUpdated"))
    assert still.state == "pending" and "still answers with version v1" in still.detail
    assert watch.assess(raw()).state == "ready"
    mixed = RolloutWatch(NEW, raw(), answering("v2", "v1", "v2"))
    assert mixed.assess(raw()).state == "pending"  # one old pod left: not done


def test_raw_ignores_a_canary_and_waits_for_all_traffic_without_a_false_timeout() -> None:
    watch = RolloutWatch(Target("v2", "brain-mri", 20), raw(), answering("v2"))
    seen = watch.assess(raw())
    assert seen.state == "ready" and "canaryTrafficPercent=20 is ignored" in seen.detail


def test_raw_failures_and_an_unreachable_predictor() -> None:
    watch = RolloutWatch(NEW, raw(), answering("v2"))
    failed = watch.assess(raw("False", "ProgressDeadlineExceeded", message="timed out"))
    assert failed == Progress("failed", "Ready=False (ProgressDeadlineExceeded)")
    assert watch.assess(raw("False", "MinimumReplicasUnavailable")).state == "pending"

    def down(_url: str, _name: str) -> str:
        raise ConnectionError("refused")

    unreachable = RolloutWatch(NEW, raw(), down)
    assert unreachable.assess(raw()).state == "pending"


def serverless(created: str, ready: str | None, share: int | None, up: str = "True") -> dict:
    traffic = (
        []
        if share is None
        else [{"revisionName": created, "latestRevision": True, "percent": share}]
    )
    return {
        "metadata": {"name": "brain-mri"},
        "status": {
            "deploymentMode": "Serverless",
            "components": {
                "predictor": {
                    "latestCreatedRevision": created,
                    "latestReadyRevision": ready,
                    "traffic": traffic,
                }
            },
            "conditions": [{"type": "Ready", "status": up}],
        },
    }


def test_serverless_ready_means_a_new_ready_revision_with_its_share() -> None:
    before = serverless("r1", "r1", 100)
    watch = RolloutWatch(Target("v2", "brain-mri", 20), before, answering("v1"))
    assert watch.assess(before).detail == "no revision for the new spec yet"  # stale status
    assert watch.assess(serverless("r2", "r1", None, "Unknown")).state == "pending"
    assert watch.assess(serverless("r2", "r2", 100)).state == "pending"  # not the canary share
    assert watch.assess(serverless("r2", "r2", 20)).state == "ready"
    first = RolloutWatch(Target("v1", "brain-mri", 20), None, answering("v1"))
    assert first.assess(serverless("r1", "r1", 100)).state == "ready"  # nothing to split with


def test_model_load_failures_end_the_wait() -> None:
    broken = raw(
        modelStatus={
            "transitionStatus": "BlockedByFailedLoad",
            "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "no model.json"},
        }
    )
    seen = RolloutWatch(NEW, raw(), answering("v1")).assess(broken)
    assert seen == Progress("failed", "model BlockedByFailedLoad: ModelLoadFailed: no model.json")
    assert RolloutWatch(NEW, raw(), answering("v1")).assess(None).state == "failed"


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
            RolloutWatch(NEW, None, answering("v2")),
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


# -- against the emulated API server and KServe -------------------------------------------------
def spec_for(version: str, **changes: Any) -> dict[str, Any]:
    return render_inference_service(
        make_spec(storage_uri=f"s3://models/brain-mri/{version}", **changes)
    )


def roll(
    api: KubeApi,
    version: str,
    timeout_s: float = 30.0,
    probe: Callable[[str, str], str] | None = None,
    **changes: Any,
) -> Rollout:
    """Roll ``version`` out (with the emulator's probe unless ``probe`` is given)."""
    canary = changes.get("canary_traffic_percent")
    return roll_out_inference_service(
        spec_for(version, **changes),
        api.api_client(),
        Target(version, "brain-mri", canary),
        timeout_s=timeout_s,
        poll_interval_s=0.02,
        **({"probe": probe} if probe else {}),
    )


@pytest.mark.parametrize("mode", ["RawDeployment", "Serverless"])
def test_roll_out_returns_once_the_new_model_serves(kube_api: KubeApi, mode: str) -> None:
    with FakeKServe(kube_api, "brain-mri", "kubeflow-user", mode=mode) as kserve:
        assert roll(kube_api, "v1").action == "created"
        second = roll(kube_api, "v2")
        assert second.action == "patched" and kserve.rolled_out == "v2"


def test_a_canary_in_raw_mode_rolls_out_fully_without_a_false_timeout(kube_api: KubeApi) -> None:
    with FakeKServe(kube_api, "brain-mri", "kubeflow-user", mode="RawDeployment") as kserve:
        roll(kube_api, "v1")
        rollout = roll(kube_api, "v2", timeout_s=5.0, canary_traffic_percent=20)
    assert "is ignored in RawDeployment mode" in rollout.detail
    assert kserve.predictor.serving == {"v2": 1.0}


def test_a_serverless_canary_gets_its_share(kube_api: KubeApi) -> None:
    with FakeKServe(kube_api, "brain-mri", "kubeflow-user", mode="Serverless") as kserve:
        roll(kube_api, "v1")
        rollout = roll(kube_api, "v2", canary_traffic_percent=30)
    assert "30 % of the traffic" in rollout.detail
    assert kserve.predictor.serving == {"v2": 0.3, "v1": 0.7}


def test_stale_ready_is_not_trusted_and_the_timeout_rolls_back(kube_api: KubeApi) -> None:
    """RawDeployment, new pods never come: Ready stays True (old pods) and v1 keeps answering."""
    stuck = lambda isvc: "stuck" if version_of(isvc) == "v2" else "ready"  # noqa: E731
    with FakeKServe(kube_api, "brain-mri", "kubeflow-user", stuck):
        roll(kube_api, "v1")
        before = kube_api.stored("brain-mri", "kubeflow-user")["spec"]
        with pytest.raises(RolloutError) as info:
            roll(kube_api, "v2", timeout_s=0.5)
    message = str(info.value)
    assert "did not serve the new model within 0.5s" in message
    assert "still answers with version v1" in message and "Rolled back" in message
    assert kube_api.stored("brain-mri", "kubeflow-user")["spec"] == before


def test_rollback_restores_spec_annotations_and_labels(kube_api: KubeApi) -> None:
    failing = lambda isvc: "failed" if version_of(isvc) == "v2" else "ready"  # noqa: E731
    with FakeKServe(kube_api, "brain-mri", "kubeflow-user", failing, mode="Serverless"):
        previous = spec_for("v1", server_args=("--max_batch_size", "8"))
        previous["metadata"]["labels"] = {"team": "imaging"}
        roll_out_inference_service(
            previous, kube_api.api_client(), Target("v1", "brain-mri"), poll_interval_s=0.02
        )
        broken = spec_for("v2", canary_traffic_percent=10)
        broken["metadata"]["annotations"]["added-by-new-spec"] = "yes"
        with pytest.raises(RolloutError) as info:
            roll_out_inference_service(
                broken, kube_api.api_client(), Target("v2", "brain-mri", 10), poll_interval_s=0.02
            )
    assert "RevisionFailed" in str(info.value)
    assert "storage URI s3://models/brain-mri/v1" in str(info.value)
    stored = kube_api.stored("brain-mri", "kubeflow-user")
    assert stored["spec"] == previous["spec"]
    assert stored["metadata"]["annotations"] == previous["metadata"]["annotations"]
    assert stored["metadata"]["labels"] == {"team": "imaging"}


def test_nothing_is_restored_over_another_rollouts_spec(kube_api: KubeApi) -> None:
    """While v2 waits another run applies v3: v2 stops at once (its model not blamed), and
    nothing of v3 is undone."""
    api_client = kube_api.api_client()
    _, first = apply_inference_service(spec_for("v1"), api_client)

    def probe(_url: str, _name: str) -> str:  # while v2 waits, another run applies v3
        current = kube_api.stored("brain-mri", "kubeflow-user")
        if version_of(current) != "v3":
            apply_inference_service(spec_for("v3"), kube_api.api_client(), current)
        return "v1"

    kube_api.set_status("brain-mri", "kubeflow-user", raw()["status"])
    started = time.monotonic()
    with pytest.raises(ConcurrentRollout, match="changed the InferenceService while this one wait"):
        roll(kube_api, "v2", timeout_s=30, probe=probe)
    assert time.monotonic() - started < 10  # at once, not at the timeout
    assert version_of(kube_api.stored("brain-mri", "kubeflow-user")) == "v3"
    # a change that lands between the last look and the rollback is not undone either
    sentence = _restore(first, spec_for("v2"), api_client, (5, 5))
    assert sentence.startswith("Not rolled back: another rollout changed it")
    assert version_of(kube_api.stored("brain-mri", "kubeflow-user")) == "v3"


def test_a_concurrent_apply_is_a_409_and_a_clear_error(
    kube_api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another run applies v3 between this rollout's read and its patch: refused, not
    overwritten, and nothing of v3 undone."""
    api_client = kube_api.api_client()
    _, stale = apply_inference_service(spec_for("v1"), api_client)
    apply_inference_service(spec_for("v3"), api_client, stale)
    real_get, reads = CustomResource.get, []

    def get(self: CustomResource, *args: Any, **kwargs: Any) -> Any:
        reads.append(1)
        return stale if len(reads) == 1 else real_get(self, *args, **kwargs)

    monkeypatch.setattr(CustomResource, "get", get)
    with pytest.raises(ConcurrentRollout, match="changed by another rollout.*v3"):
        roll(kube_api, "v2", timeout_s=1, probe=answering("v2"))
    assert version_of(kube_api.stored("brain-mri", "kubeflow-user")) == "v3"


def test_a_failed_rollback_is_reported_with_what_to_restore(
    kube_api: KubeApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    api_client = kube_api.api_client()
    apply_inference_service(spec_for("v1"), api_client)
    original = CustomResource.patch

    def refuse(self: CustomResource, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("action") == "restore":
            raise KubeApiError("HTTP 403 Forbidden")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CustomResource, "patch", refuse)
    with pytest.raises(RolloutError) as info:
        roll(kube_api, "v2", timeout_s=0.1, probe=answering("v1"))
    message = str(info.value)
    assert "Rolling back to the previous spec failed as well: HTTP 403 Forbidden" in message
    assert "its storage URI was s3://models/brain-mri/v1" in message

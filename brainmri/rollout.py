"""Rolling the InferenceService to a new model, and telling when the new model really serves.

KServe's ``Ready`` condition alone does not tell it. In RawDeployment (``Standard``) mode it is
the Deployment's ``Available``, which the old pods keep true through a rolling update, and
``status.observedGeneration`` is copied from the Deployment, another object's counter (KServe's
``PropagateRawStatus``); so neither tells a stale status from a current one. A rollout is done:

- in RawDeployment mode, when the predictor (``status.address.url``) answers with the new model
  version :data:`CONFIRMATIONS` times in a row (old pods answer the old one until the last of
  them is gone). KServe splits traffic only with Knative: a ``canaryTrafficPercent`` does
  nothing in this mode, which the rollout says, and it waits for all the traffic;
- in Serverless (Knative) mode, when a new revision was created for the new spec, it is the
  latest ready revision, and the traffic gives it the intended share (the canary's, or 100).

``Ready=False`` with a reason that is not progress, or a model that failed to load, ends the wait
at once. On a failure or timeout the previous spec is restored, unless another rollout changed
the InferenceService since this one applied its spec: nothing is ever restored over another
run's spec, and a rollout whose spec another replaces while it waits stops at once
(:class:`ConcurrentRollout`: its model is not blamed, a retry may succeed). Every write carries
the ``resourceVersion`` it read, so a concurrent change is a 409 and a decision, never a silent
overwrite.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests
from kubernetes import client
from PIL import Image

from brainmri.inference_service import (
    DEPLOYMENT_MODE_ANNOTATION,
    INFERENCE_SERVICES,
    storage_uri_of,
)
from brainmri.kube import (
    DEFAULT_REQUEST_TIMEOUT_S,
    PENDING,
    TIMEOUT,
    AlreadyExists,
    Conflict,
    KubeApiError,
    Progress,
    poll,
)

DEFAULT_READY_TIMEOUT_S = 600.0  # how long a rollout may take
DEFAULT_POLL_INTERVAL_S = 5.0
CONFIRMATIONS = 3  # answers in a row with the new version that end a RawDeployment rollout
PROBE_TIMEOUT_S = 10.0
RAW_MODES = frozenset({"RawDeployment", "Standard"})
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
    """The new model does not serve; the message says why and what was restored."""


class ConcurrentRollout(RolloutError):
    """Another rollout changed the InferenceService while this one applied its spec or waited
    for it: nothing of this one is restored or blamed on its model."""


SUPERSEDED = "superseded"


@dataclass(frozen=True)
class Target:
    """What a rollout is meant to serve."""

    version: str  # the model version the predictor reports once the new model serves
    model_name: str
    canary_percent: int | None = None  # None: all traffic


@dataclass(frozen=True)
class Rollout:
    """A rollout whose new model serves."""

    action: str  # "created", "patched" or "unchanged" (the spec was already this one)
    detail: str  # what ended the wait
    canary_percent: int | None = None  # the new model's share when split; None: all traffic


def probe_model_version(url: str, model_name: str, timeout_s: float = PROBE_TIMEOUT_S) -> str:
    """The model version the predictor at ``url`` answers with (one tiny v1 request)."""
    buffer = io.BytesIO()
    Image.new("L", (32, 32)).save(buffer, format="PNG")
    body = {"instances": [{"image_bytes": {"b64": base64.b64encode(buffer.getvalue()).decode()}}]}
    endpoint = f"{url.rstrip('/')}/v1/models/{model_name}:predict"
    response = requests.post(endpoint, json=body, timeout=timeout_s)
    response.raise_for_status()
    return str(response.json()["predictions"][0]["model_version"])


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


def deployment_mode(isvc: dict[str, Any] | None) -> str:
    """``RawDeployment``/``Standard`` or ``Serverless``: as the status reports it, else as the
    annotation asks, else as the status's shape shows."""
    isvc = isvc or {}
    status = isvc.get("status") or {}
    annotations = (isvc.get("metadata") or {}).get("annotations") or {}
    mode = status.get("deploymentMode") or annotations.get(DEPLOYMENT_MODE_ANNOTATION)
    if mode:
        return str(mode)
    predictor = (status.get("components") or {}).get("predictor") or {}
    return "Serverless" if "latestCreatedRevision" in predictor else "RawDeployment"


def _predictor_status(isvc: dict[str, Any] | None) -> dict[str, Any]:
    return (((isvc or {}).get("status") or {}).get("components") or {}).get("predictor") or {}


class RolloutWatch:
    """Tells whether the InferenceService serves :class:`Target` yet (see the module doc)."""

    def __init__(
        self,
        target: Target,
        previous: dict[str, Any] | None,
        probe: Callable[[str, str], str] = probe_model_version,
        confirmations: int = CONFIRMATIONS,
    ) -> None:
        self.target, self.probe, self.confirmations = target, probe, confirmations
        before = _predictor_status(previous)
        self.previous_revision = before.get("latestCreatedRevision")
        # KServe splits traffic only once a revision has rolled out: the first takes it all
        self.first_revision = not before.get("latestReadyRevision")
        self.canary_served: int | None = None  # the split once ready (None: all traffic)
        self.applied_spec: dict[str, Any] | None = None  # what this rollout applied

    def assess(self, isvc: dict[str, Any] | None) -> Progress:
        if isvc is None:
            return Progress("failed", f"the {INFERENCE_SERVICES.kind} was deleted while waiting")
        if self.applied_spec is not None and isvc.get("spec") != self.applied_spec:
            return Progress(
                SUPERSEDED,
                f"another rollout changed the {INFERENCE_SERVICES.kind} while this one waited "
                f"(it now serves {storage_uri_of(isvc)})",
            )
        failure = _failure(isvc)
        if failure:
            return Progress("failed", failure)
        if deployment_mode(isvc) in RAW_MODES:
            return self._raw(isvc)
        return self._serverless(isvc)

    def _raw(self, isvc: dict[str, Any]) -> Progress:
        condition = ready_condition(isvc)
        ignored = (
            f"; canaryTrafficPercent={self.target.canary_percent} is ignored in "
            f"{deployment_mode(isvc)} mode (KServe splits traffic only with Knative): all "
            "traffic goes to the new model"
            if self.target.canary_percent is not None
            else ""
        )
        if (condition or {}).get("status") != "True":
            return Progress(PENDING, describe_condition(condition) + ignored)
        status = isvc.get("status") or {}
        url = (status.get("address") or {}).get("url") or status.get("url")
        if not url:
            return Progress(PENDING, "Ready, but no predictor address in the status yet")
        answers = []
        for _ in range(self.confirmations):
            try:
                answers.append(self.probe(url, self.target.model_name))
            except (OSError, KeyError, IndexError, ValueError) as err:  # requests: OSError too
                return Progress(PENDING, f"the predictor at {url} does not answer yet ({err})")
            if answers[-1] != self.target.version:
                return Progress(
                    PENDING,
                    f"Ready, but the predictor at {url} still answers with version "
                    f"{answers[-1]} (rolling update in progress){ignored}",
                )
        return Progress(
            "ready",
            f"{describe_condition(condition)}; the predictor answers with version "
            f"{self.target.version} ({self.confirmations} of {self.confirmations}){ignored}",
        )

    def _serverless(self, isvc: dict[str, Any]) -> Progress:
        predictor = _predictor_status(isvc)
        created = predictor.get("latestCreatedRevision")
        if not created or created == self.previous_revision:
            return Progress(PENDING, "no revision for the new spec yet")
        if predictor.get("latestReadyRevision") != created:
            return Progress(PENDING, f"revision {created} is not ready yet")
        canary = self.target.canary_percent
        intended = 100 if canary is None or self.first_revision else canary
        share = next(
            (t.get("percent") for t in predictor.get("traffic") or [] if t.get("latestRevision")),
            None,
        )
        if share != intended:
            return Progress(
                PENDING, f"revision {created} has {share} % of the traffic, not {intended}"
            )
        condition = ready_condition(isvc)
        if (condition or {}).get("status") != "True":
            return Progress(PENDING, describe_condition(condition))
        self.canary_served = intended if intended < 100 else None
        return Progress("ready", f"revision {created} is ready with {intended} % of the traffic")


def _failure(isvc: dict[str, Any]) -> str:
    """Why the new spec will not serve, when KServe says so; else empty."""
    model_status = (isvc.get("status") or {}).get("modelStatus") or {}
    if model_status.get("transitionStatus") in FAILED_TRANSITIONS:
        failure = model_status.get("lastFailureInfo") or {}
        why = ": ".join(str(failure[k]) for k in ("reason", "message") if failure.get(k))
        return f"model {model_status['transitionStatus']}: {why}".rstrip(": ")
    condition = ready_condition(isvc)
    if (
        condition is not None
        and condition.get("status") == "False"
        and (condition.get("reason") or "") not in IN_PROGRESS_REASONS
    ):
        return describe_condition(condition)
    return ""


def apply_inference_service(
    manifest: dict[str, Any],
    api_client: client.ApiClient,
    previous: dict[str, Any] | None = None,
    *,
    timeout: tuple[float, float] = DEFAULT_REQUEST_TIMEOUT_S,
) -> tuple[str, dict[str, Any]]:
    """Create the InferenceService (``previous`` None) or merge-patch ``previous`` with it, the
    patch carrying ``previous``'s resourceVersion: :class:`Conflict` when it changed meanwhile.

    Returns ``"created"`` or ``"patched"`` and the object as stored. A patch also clears
    ``canaryTrafficPercent`` when the manifest has none, so a plain spec ends a canary.
    """
    if previous is None:
        return "created", INFERENCE_SERVICES.create(api_client, manifest, timeout)
    meta = manifest["metadata"]
    version = (previous.get("metadata") or {}).get("resourceVersion")
    patch = {**manifest, "metadata": {**meta, "resourceVersion": version}}
    patch["spec"] = {**manifest["spec"]}
    patch["spec"]["predictor"] = {"canaryTrafficPercent": None, **manifest["spec"]["predictor"]}
    stored = INFERENCE_SERVICES.patch(
        api_client, meta["namespace"], meta["name"], patch, timeout, action="apply"
    )
    return "patched", stored


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
    target: Target,
    *,
    timeout_s: float = DEFAULT_READY_TIMEOUT_S,
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
    request_timeout: tuple[float, float] = DEFAULT_REQUEST_TIMEOUT_S,
    probe: Callable[[str, str], str] = probe_model_version,
) -> Rollout:
    """Apply ``manifest`` and wait until the new model serves (see the module doc).

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
    try:
        action, stored = apply_inference_service(
            manifest, api_client, previous, timeout=request_timeout
        )
    except (AlreadyExists, Conflict) as err:
        current = INFERENCE_SERVICES.get(api_client, namespace, name, request_timeout)
        if current is None or current.get("spec") != manifest["spec"]:
            raise ConcurrentRollout(
                f"{where} was changed by another rollout while this one applied its spec (it "
                f"now serves {storage_uri_of(current)}); nothing was changed by this run: retry "
                "it once the other is done"
            ) from err
        action, stored = "unchanged", current  # already ours: a retried task of this run
    watch = RolloutWatch(target, previous, probe)
    watch.applied_spec = stored.get("spec")
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
        return Rollout(action, outcome.detail, watch.canary_served)
    if outcome.state == SUPERSEDED:
        raise ConcurrentRollout(
            f"{where}: {outcome.detail}; this run's model was never confirmed serving and "
            "nothing is restored over the other's spec: retry it once the other is done"
        )
    if outcome.state == TIMEOUT:
        problem = (
            f"{where} did not serve the new model within {timeout_s:g}s (last seen: "
            f"{outcome.detail})"
        )
    else:
        problem = f"{where} failed to roll out: {outcome.detail}"
    if previous is None:
        raise RolloutError(
            f"{problem}. It was created by this rollout and is left in place for inspection "
            f"(kubectl describe inferenceservice -n {namespace} {name}); no model was served "
            "from it before, so no client lost one."
        )
    raise RolloutError(f"{problem}. {_restore(previous, stored, api_client, request_timeout)}")


def _restore(
    previous: dict[str, Any],
    applied: dict[str, Any],
    api_client: client.ApiClient,
    timeout: tuple[float, float],
) -> str:
    """Patch the InferenceService back to ``previous``'s spec, annotations and labels, if it
    still carries the spec this rollout ``applied``; what happened, as a sentence."""
    meta = previous["metadata"]
    name, namespace = meta["name"], meta["namespace"]
    try:
        current = INFERENCE_SERVICES.get(api_client, namespace, name, timeout)
        if current is None:
            raise KubeApiError(f"{INFERENCE_SERVICES.describe(namespace, name)} no longer exists")
        if current.get("spec") != applied.get("spec"):
            return (
                "Not rolled back: another rollout changed it since this one applied its spec "
                f"(it now serves {storage_uri_of(current)}), and nothing is restored over it."
            )
        patch = merge_patch(_restorable(current), _restorable(previous))
        if patch:
            patch.setdefault("metadata", {})["resourceVersion"] = current["metadata"].get(
                "resourceVersion"
            )
            INFERENCE_SERVICES.patch(api_client, namespace, name, patch, timeout, action="restore")
    except Conflict:
        return (
            "Not rolled back: another rollout changed it at the same moment, and nothing is "
            "restored over it."
        )
    except KubeApiError as err:
        raise RolloutError(
            f"Rolling back to the previous spec failed as well: {err}. Restore it by hand (its "
            f"storage URI was {storage_uri_of(previous)})."
        ) from err
    return f"Rolled back: the previous spec (storage URI {storage_uri_of(previous)}) is restored."


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

"""A Kubernetes API server that behaves like a real one where the tests depend on it, and a
KServe controller and predictor that behave like KServe's.

:class:`ApiServer` is kmock's in-memory emulator (real HTTP, run on its own loop in a thread)
with what a real API server does and kmock does not: ``metadata.generation`` (1 on create, +1 on
every spec change), ``resourceVersion`` (new on every write; a write naming an older one is a
409 Conflict), ``uid`` and ``creationTimestamp``, and the ``status`` subresource kept apart (a
write to the object leaves its status alone; a write to ``/status`` changes only the status).

:class:`FakeKServe` plays KServe's controller for one InferenceService, in either mode, as
KServe's own status code does (``pkg/apis/serving/v1beta1/inference_service_status.go``):

- RawDeployment: ``Ready`` is the Deployment's ``Available``, so it stays True through a rolling
  update (the old pods are available), ``observedGeneration`` is the Deployment's own counter,
  ``canaryTrafficPercent`` is ignored; a rollout that fails keeps Ready until the progress
  deadline, then ``Ready=False (ProgressDeadlineExceeded)``;
- Serverless: every spec change creates a revision (``latestCreatedRevision``), which becomes
  ``latestReadyRevision`` when it is up; the traffic gives it the canary's share (the rest to
  the previous revision, tag ``prev``) or everything; a failed revision is
  ``Ready=False (RevisionFailed)``.

Behind ``status.address.url`` a :class:`FakePredictor` answers the v1 protocol with the version
of the model each request lands on: the old one until a rolling update is over, a mix during a
canary.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

import kmock
import pytest
from kmock._internal import dicts
from kmock._internal.enums import action as kube_action
from kubernetes import client

from brainmri.inference_service import INFERENCE_SERVICES, storage_uri_of

ISVC_RESOURCE = f"{INFERENCE_SERVICES.api_version}/{INFERENCE_SERVICES.plural}"
T = TypeVar("T")


VERBS = {
    kube_action.FETCH: "get",
    kube_action.LIST: "list",
    kube_action.WATCH: "watch",
    kube_action.CREATE: "create",
    kube_action.DELETE: "delete",
}


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus generation, resourceVersion and the status subresource; it also
    records every RBAC verb asked of it (:attr:`verbs`: ``(group, resource, verb)``)."""

    _writes: asyncio.Lock | None = None
    _version: int = 0
    verbs: set[tuple[str, str, str]] | None = None

    def _record(self, request: Any) -> None:
        if request.resource is None or request.action is None:
            return
        if request.action == kube_action.UPDATE:
            verb = "patch" if str(request.method).upper().endswith("PATCH") else "update"
        else:
            verb = VERBS[request.action]
        plural = request.resource.plural + (
            f"/{request.subresource}" if request.subresource else ""
        )
        if self.verbs is None:
            self.verbs = set()
        self.verbs.add((request.resource.group or "", plural, verb))

    async def _handle(self, request: Any) -> Any:
        self._record(request)
        writing = request.action in (kube_action.CREATE, kube_action.UPDATE)
        if request.resource is None or not writing or not isinstance(request.data, dict):
            return await super()._handle(request)
        if self._writes is None:
            self._writes = asyncio.Lock()
        async with self._writes:  # stamp and store as one step: no write slips in between
            self._stamp(request)
            return await super()._handle(request)

    def _stamp(self, request: Any) -> None:
        data, self._version = request.data, self._version + 1
        meta = data.setdefault("metadata", {})
        if request.action == kube_action.CREATE:
            meta.update(
                generation=1,
                resourceVersion=str(self._version),
                uid=str(uuid.uuid4()),
                creationTimestamp=datetime.now(UTC).isoformat(timespec="seconds"),
            )
            data.pop("status", None)  # a create sets no status
            return
        key = (request.resource, request.namespace, request.name)
        if key not in self._objects or self._objects[key].deleted:
            return  # kmock answers 404
        current = copy.deepcopy(self._objects[key].raw)
        wanted = meta.get("resourceVersion")
        if wanted and wanted != current["metadata"].get("resourceVersion"):
            raise kmock.KubernetesError(
                status=409,
                reason="Conflict",
                message=(
                    "Operation cannot be fulfilled: the object has been modified; please apply "
                    "your changes to the latest version and try again"
                ),
            )
        if request.subresource == "status":
            for key_ in [k for k in data if k not in ("status", "metadata")]:
                del data[key_]
        else:
            data.pop("status", None)
        merged = dicts.patch_dict(current, {k: v for k, v in data.items() if k != "metadata"})
        generation = current["metadata"].get("generation", 1)
        if merged.get("spec") != current.get("spec"):
            generation += 1
        meta.update(resourceVersion=str(self._version), generation=generation)


@dataclass
class KubeApi:
    """A running API server: its URL, its object store, and a way to act on its loop."""

    emulator: ApiServer
    url: str
    loop: asyncio.AbstractEventLoop
    clients: list[client.ApiClient] = field(default_factory=list)

    def api_client(self) -> client.ApiClient:
        """A real ``kubernetes`` client pointed at the emulator (closed at teardown)."""
        configuration = client.Configuration()
        configuration.host = self.url
        configuration.retries = 0
        api_client = client.ApiClient(configuration)
        self.clients.append(api_client)
        return api_client

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the emulator's loop, so it never races a request being served."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=10)

    def stored(self, name: str, namespace: str, resource: str = ISVC_RESOURCE) -> dict[str, Any]:
        """The current stored state of an object (a deep copy)."""
        obj = self.call(lambda: self.emulator.objects[resource, namespace, name].raw)
        return copy.deepcopy(obj)

    def set_status(self, name: str, namespace: str, status: dict[str, Any]) -> None:
        """Merge ``status`` into the stored object directly (no HTTP, no watch event)."""
        obj = self.emulator.objects[ISVC_RESOURCE, namespace, name]
        self.call(lambda: obj.patch({"status": status}))

    def exists(self, name: str, namespace: str) -> bool:
        def check() -> bool:
            try:
                return not self.emulator.objects[ISVC_RESOURCE, namespace, name].deleted
            except KeyError:
                return False

        return self.call(check)


def ready_status(status: str = "True", reason: str = "", message: str = "") -> dict[str, Any]:
    """A status with one ``Ready`` condition, stamped with the current time."""
    condition = {
        "type": "Ready",
        "status": status,
        "lastTransitionTime": datetime.now(UTC).isoformat(),
    }
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return {"conditions": [condition]}


class FakePredictor:
    """The predictor Service: answers ``POST /v1/models/<name>:predict`` with the version of
    the model that the request lands on (``serving``: version -> share of the traffic)."""

    def __init__(self) -> None:
        self.serving: dict[str, float] = {}
        self.answered: list[str] = []
        predictor = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                choices = dict(predictor.serving)
                if not choices:
                    self.send_error(503, "no model loaded")
                    return
                version = random.choices(list(choices), weights=list(choices.values()))[0]
                predictor.answered.append(version)
                body = json.dumps({"predictions": [{"label": "glioma", "model_version": version}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


Outcome = Callable[[dict[str, Any]], str]  # the stored object -> "ready" | "failed" | "stuck"


def version_of(isvc: dict[str, Any]) -> str:
    """The model version a spec serves: the last part of its storage URI."""
    return (storage_uri_of(isvc) or "none").rstrip("/").rsplit("/", 1)[-1]


class FakeKServe:
    """KServe's controller for one InferenceService, played from a thread (see the module doc).

    ``outcome(stored object)`` decides what each new spec does: ``ready`` (it rolls out after
    ``delay_s``), ``failed`` (its pods never start: a failed revision, or in RawDeployment the
    progress deadline after ``delay_s``), ``stuck`` (nothing ever changes: the old pods keep
    serving and the status keeps saying Ready).
    """

    def __init__(
        self,
        api: KubeApi,
        name: str,
        namespace: str,
        outcome: Outcome | None = None,
        *,
        mode: str = "RawDeployment",
        delay_s: float = 0.1,
        interval_s: float = 0.01,
        failure_message: str = "Back-off pulling image",
    ) -> None:
        self.api, self.name, self.namespace = api, name, namespace
        self.outcome: Outcome = outcome or (lambda _isvc: "ready")
        self.mode, self.delay_s, self.interval_s = mode, delay_s, interval_s
        self.failure_message = failure_message
        self.predictor = FakePredictor()
        self.specs_seen: list[dict[str, Any]] = []
        self.rolled_out: str | None = None  # the version the last successful rollout serves
        self.revisions = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-kserve", daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> FakeKServe:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.predictor.close()
        if self._error is not None:
            raise self._error

    def wait_for_specs(self, count: int, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """The specs seen, once there are at least ``count`` (it polls from its own thread)."""
        deadline = time.monotonic() + timeout_s
        while len(self.specs_seen) < count and time.monotonic() < deadline:
            time.sleep(self.interval_s)
        return list(self.specs_seen)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if self.api.exists(self.name, self.namespace):
                    stored = self.api.stored(self.name, self.namespace)
                    if not self.specs_seen or stored.get("spec") != self.specs_seen[-1]:
                        self.specs_seen.append(copy.deepcopy(stored.get("spec")))
                        self._reconcile(stored)
                time.sleep(self.interval_s)
        except BaseException as exc:  # re-raised in the test by __exit__
            self._error = exc

    def _status(self, **fields: Any) -> None:
        """Write the status through the API's ``/status`` subresource, as a controller does."""
        client.CustomObjectsApi(self.api.api_client()).patch_namespaced_custom_object_status(
            INFERENCE_SERVICES.group,
            INFERENCE_SERVICES.version,
            self.namespace,
            INFERENCE_SERVICES.plural,
            self.name,
            {"status": {"deploymentMode": self.mode, **fields}},
        )

    def _reconcile(self, stored: dict[str, Any]) -> None:
        outcome, version = self.outcome(stored), version_of(stored)
        if self.mode == "Serverless":
            self._knative(stored, outcome, version)
        else:
            self._deployment(outcome, version)

    def _deployment(self, outcome: str, version: str) -> None:
        """A rolling update of the predictor's Deployment."""
        self.revisions += 1  # the Deployment's own generation
        old = self.rolled_out
        address = {"address": {"url": self.predictor.url}}
        if old is None:  # first rollout: not available until the pods start
            self._status(
                observedGeneration=self.revisions,
                **ready_status("False", "MinimumReplicasUnavailable"),
            )
        else:  # the old pods stay available: Ready stays True, with the old version answering
            self._status(
                observedGeneration=self.revisions,
                **address,
                **ready_status("True", "ReplicaSetUpdated"),
            )
        if outcome == "stuck" or self._stop.wait(self.delay_s):
            return
        if outcome == "failed":
            replica_set = f'ReplicaSet "{self.name}-predictor"'
            message = f"{replica_set} has timed out progressing: {self.failure_message}"
            self._status(**ready_status("False", "ProgressDeadlineExceeded", message))
            return
        self.rolled_out = version
        self.predictor.serving = {version: 1.0}
        self._status(**address, **ready_status("True", "NewReplicaSetAvailable"))

    def _knative(self, stored: dict[str, Any], outcome: str, version: str) -> None:
        """A new Knative revision, then the traffic split."""
        self.revisions += 1
        revision = f"{self.name}-predictor-{self.revisions:05d}"
        previous = (stored.get("status") or {}).get("components", {}).get("predictor", {})
        ready_revision = previous.get("latestReadyRevision")
        predictor = {
            "latestCreatedRevision": revision,
            "latestReadyRevision": ready_revision,
            "traffic": previous.get("traffic") or [],
        }
        self._status(
            components={"predictor": predictor}, **ready_status("Unknown", "RevisionMissing")
        )
        if outcome == "stuck" or self._stop.wait(self.delay_s):
            return
        if outcome == "failed":
            message = f'Revision "{revision}" failed with message: {self.failure_message}.'
            self._status(**ready_status("False", "RevisionFailed", message))
            return
        canary = stored["spec"]["predictor"].get("canaryTrafficPercent")
        traffic = [
            {
                "revisionName": revision,
                "latestRevision": True,
                "percent": 100 if canary is None or ready_revision is None else canary,
            }
        ]
        if canary is not None and ready_revision is not None and canary < 100:
            traffic.append(
                {
                    "revisionName": ready_revision,
                    "latestRevision": False,
                    "percent": 100 - canary,
                    "tag": "prev",
                }
            )
        shares = {version: traffic[0]["percent"] / 100}
        if len(traffic) > 1 and self.rolled_out is not None:
            shares[self.rolled_out] = traffic[1]["percent"] / 100
        self.predictor.serving = shares
        if traffic[0]["percent"] == 100:
            self.rolled_out = version
        predictor = {
            "latestCreatedRevision": revision,
            "latestReadyRevision": revision,
            "traffic": traffic,
        }
        self._status(
            components={"predictor": predictor},
            address={"url": self.predictor.url},
            **ready_status("True"),
        )


@pytest.fixture()
def kube_api() -> Iterator[KubeApi]:
    """A fresh in-memory Kubernetes API server that knows KServe's InferenceService."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        emulator = ApiServer()
        emulator.resources[ISVC_RESOURCE] = kmock.ResourceInfo(
            kind=INFERENCE_SERVICES.kind,
            singular="inferenceservice",
            shortnames={"isvc"},
            namespaced=True,
            verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
            subresources={"status"},
        )
        async with emulator, kmock.Server(emulator) as server:
            box.update(
                api=KubeApi(emulator, str(server.url).rstrip("/"), asyncio.get_running_loop()),
                stop=stop,
            )
            ready.set()
            await stop.wait()

    def main() -> None:
        try:
            asyncio.run(serve())
        except BaseException as exc:  # surfaced to the test below, never swallowed
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=main, name="kmock-k8s", daemon=True)
    thread.start()
    assert ready.wait(timeout=10), "kmock server did not start within 10 s"
    if "error" in box:
        raise box["error"]
    api: KubeApi = box["api"]
    try:
        yield api
    finally:
        for api_client in api.clients:
            api_client.close()
        api.loop.call_soon_threadsafe(box["stop"].set)
        thread.join(timeout=10)
        assert not thread.is_alive(), "kmock server thread did not stop"

"""kmock's in-memory Kubernetes API server, run on its own loop in a thread, knowing KServe.

The synchronous ``kubernetes`` client talks to it over real HTTP like to a real API server.
:class:`FakeController` plays KServe's controller for one InferenceService: it sets the status
conditions of every new spec it sees, so rollouts can be tested end to end.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import kmock
import pytest
from kubernetes import client

from brainmri.inference_service import INFERENCE_SERVICES

ISVC_RESOURCE = f"{INFERENCE_SERVICES.api_version}/{INFERENCE_SERVICES.plural}"
T = TypeVar("T")


@dataclass
class KubeApi:
    """A running emulator: its URL, its object store, and a way to act on its loop."""

    emulator: kmock.KubernetesEmulator
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

    def stored(self, name: str, namespace: str) -> dict[str, Any]:
        """The current stored state of an InferenceService (a deep copy)."""
        obj = self.call(lambda: self.emulator.objects[ISVC_RESOURCE, namespace, name].raw)
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


Outcome = Callable[[dict[str, Any]], dict[str, Any] | None]


class FakeController:
    """KServe's controller for one InferenceService, played from a thread.

    Whenever the stored ``spec`` differs from the last one it saw, it sets ``Ready=Unknown``
    (reason ``Deploying``; skipped when ``show_progress`` is False), waits ``delay_s``, then
    merges in the status ``outcome(stored object)`` returns (default: ``Ready=True``). An
    outcome of ``None`` leaves the status alone, like a controller that never gets to it.
    Like the emulator itself it sets neither ``metadata.generation`` nor ``observedGeneration``.
    """

    def __init__(
        self,
        api: KubeApi,
        name: str,
        namespace: str,
        outcome: Outcome | None = None,
        *,
        show_progress: bool = True,
        delay_s: float = 0.05,
        interval_s: float = 0.01,
    ) -> None:
        self.api, self.name, self.namespace = api, name, namespace
        self.outcome: Outcome = outcome or (lambda _isvc: ready_status())
        self.show_progress = show_progress
        self.delay_s, self.interval_s = delay_s, interval_s
        self.specs_seen: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-kserve", daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> FakeController:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
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

    def _reconcile(self, stored: dict[str, Any]) -> None:
        status = self.outcome(stored)
        if status is None:
            return
        if self.show_progress:
            self.api.set_status(self.name, self.namespace, ready_status("Unknown", "Deploying"))
            self._stop.wait(self.delay_s)
        self.api.set_status(self.name, self.namespace, status)


@pytest.fixture()
def kube_api() -> Iterator[KubeApi]:
    """A fresh in-memory Kubernetes API server that knows KServe's InferenceService."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        emulator = kmock.KubernetesEmulator()
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

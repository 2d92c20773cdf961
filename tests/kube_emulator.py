"""kmock's in-memory Kubernetes API server, run on its own loop in a thread, knowing KServe.

The synchronous ``kubernetes`` client talks to it over real HTTP like to a real API server.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import kmock
import pytest
from kubernetes import client

from brainmri.inference_service import GROUP, KIND, PLURAL, VERSION

ISVC_RESOURCE = f"{GROUP}/{VERSION}/{PLURAL}"
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


@pytest.fixture()
def kube_api() -> Iterator[KubeApi]:
    """A fresh in-memory Kubernetes API server that knows KServe's InferenceService."""
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def serve() -> None:
        stop = asyncio.Event()
        emulator = kmock.KubernetesEmulator()
        emulator.resources[ISVC_RESOURCE] = kmock.ResourceInfo(
            kind=KIND,
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

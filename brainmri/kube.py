"""The Kubernetes API, for the custom resources this project creates (KServe InferenceServices,
Kubeflow PyTorchJobs): the client, create/get/patch with errors that say what to check, and a
poll loop that outlives transient API errors.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException

DEFAULT_REQUEST_TIMEOUT_S: tuple[float, float] = (5.0, 30.0)  # (connect, read) per request
PENDING = "pending"
TIMEOUT = "timeout"
Manifest = dict[str, Any]


class KubeApiError(RuntimeError):
    """The Kubernetes API refused the request or could not be reached; the message says why."""


class Conflict(KubeApiError):
    """A write was refused with 409: the object changed since it was read (or, on a create,
    one of that name exists)."""


class AlreadyExists(Conflict):
    """A create was refused with 409: an object of that name exists."""


@dataclass(frozen=True)
class CustomResource:
    """One custom resource type, and who installs its CRD (named when the API has none)."""

    group: str
    version: str
    plural: str
    kind: str
    installed_by: str

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def describe(self, namespace: str, name: str) -> str:
        return f"{self.kind} {namespace}/{name}"

    def create(
        self,
        api_client: client.ApiClient,
        manifest: Manifest,
        timeout: tuple[float, float] = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> Manifest:
        """Create ``manifest``; the object as stored. :class:`AlreadyExists` on a 409."""
        meta = manifest["metadata"]
        action = f"create {self.describe(meta['namespace'], meta['name'])}"
        try:
            return self._api(api_client).create_namespaced_custom_object(
                self.group,
                self.version,
                meta["namespace"],
                self.plural,
                manifest,
                _request_timeout=timeout,
            )
        except ApiException as exc:
            if exc.status == 409:
                raise AlreadyExists(f"{action}: it already exists") from exc
            raise self._error(exc, api_client, action) from exc
        except urllib3.exceptions.HTTPError as exc:
            raise self._error(exc, api_client, action) from exc

    def get(
        self,
        api_client: client.ApiClient,
        namespace: str,
        name: str,
        timeout: tuple[float, float] = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> Manifest | None:
        """The object as stored, or ``None`` when it does not exist."""
        try:
            return self._api(api_client).get_namespaced_custom_object(
                self.group, self.version, namespace, self.plural, name, _request_timeout=timeout
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise self._error(exc, api_client, f"read {self.describe(namespace, name)}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise self._error(exc, api_client, f"read {self.describe(namespace, name)}") from exc

    def patch(
        self,
        api_client: client.ApiClient,
        namespace: str,
        name: str,
        body: Manifest,
        timeout: tuple[float, float] = DEFAULT_REQUEST_TIMEOUT_S,
        action: str = "patch",
    ) -> Manifest:
        """Merge-patch the object with ``body``; the object as stored. A ``resourceVersion`` in
        ``body``'s metadata makes it conditional: :class:`Conflict` when the object changed."""
        try:
            return self._api(api_client).patch_namespaced_custom_object(
                self.group,
                self.version,
                namespace,
                self.plural,
                name,
                body,
                _request_timeout=timeout,
            )
        except (ApiException, urllib3.exceptions.HTTPError) as exc:
            what = f"{action} {self.describe(namespace, name)}"
            if isinstance(exc, ApiException) and exc.status == 409:
                raise Conflict(f"{what}: it changed since it was read (HTTP 409)") from exc
            raise self._error(exc, api_client, what) from exc

    @staticmethod
    def _api(api_client: client.ApiClient) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(api_client)

    def _error(self, exc: Exception, api_client: client.ApiClient, action: str) -> KubeApiError:
        """A client-side failure as an error that says what to check."""
        host = api_client.configuration.host
        if isinstance(exc, urllib3.exceptions.HTTPError) or (
            isinstance(exc, ApiException) and not exc.status
        ):
            return KubeApiError(
                f"cannot reach the Kubernetes API server at {host} to {action}: {exc}. "
                "Check that the cluster is running, that the kubeconfig context (or in-cluster "
                "service account) points at it, and that no proxy or firewall blocks the port."
            )
        assert isinstance(exc, ApiException)
        message = f"Kubernetes API server at {host} refused to {action}: HTTP {exc.status} "
        message += str(exc.reason)
        if exc.status == 404:
            message += (
                f" (is {self.installed_by} installed, i.e. does the {self.plural}.{self.group} "
                "CRD exist?)"
            )
        elif exc.status in (401, 403):
            message += " (check the credentials and RBAC of the kubeconfig user / service account)"
        return KubeApiError(message)


@dataclass(frozen=True)
class Progress:
    """One look at something being waited for: :data:`PENDING` while it goes on, any other
    state (``ready``, ``failed``, :data:`TIMEOUT`, ...) ends the wait; ``detail`` says why."""

    state: str
    detail: str


def poll(
    look: Callable[[], Progress],
    *,
    timeout_s: float,
    interval_s: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Progress:
    """Call ``look`` every ``interval_s`` until it says anything but pending, or time runs out
    (a :data:`TIMEOUT` carrying the last detail).

    An API error while looking is no verdict on what is awaited: polling goes on, and the error
    is the detail reported if the wait times out.
    """
    deadline = clock() + timeout_s
    while True:
        try:
            seen = look()
        except KubeApiError as err:
            seen = Progress(PENDING, f"last poll failed: {err}")
        if seen.state != PENDING:
            return seen
        left = deadline - clock()
        if left <= 0:
            return Progress(TIMEOUT, seen.detail)
        sleep(min(interval_s, left))


def _kubeconfig_paths() -> list[Path]:
    """Existing kubeconfig files: those in ``KUBECONFIG`` if set, else ``~/.kube/config``."""
    raw = os.environ.get("KUBECONFIG", "")
    candidates = [Path(p).expanduser() for p in raw.split(os.pathsep) if p] or [
        Path.home() / ".kube" / "config"
    ]
    return [p for p in candidates if p.is_file()]


def cluster_api_client() -> client.ApiClient | None:
    """An API client for the current cluster, or ``None`` when no cluster is configured.

    In-cluster service-account config wins; otherwise the kubeconfig named by ``KUBECONFIG``
    (or ``~/.kube/config``) is used, with its current context. Inside a pod
    (``KUBERNETES_SERVICE_HOST`` set) an unusable service account is an error, not "no
    cluster": a step that changes the cluster must not quietly skip it.
    """
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
        return client.ApiClient(configuration)
    except ConfigException as exc:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise KubeApiError(
                f"running in a pod, but its service account is unusable ({exc}): check that "
                "the pod's ServiceAccount token is mounted (automountServiceAccountToken)"
            ) from exc
    paths = _kubeconfig_paths()
    if not paths:
        return None
    joined = os.pathsep.join(str(p) for p in paths)
    try:
        return config.new_client_from_config(config_file=joined)
    except ConfigException as exc:
        raise KubeApiError(f"kubeconfig {joined} is unusable: {exc}") from exc

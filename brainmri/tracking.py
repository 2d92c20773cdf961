"""Experiment tracking and the model registry in MLflow, only when ``MLFLOW_TRACKING_URI`` is set.

| variable                   | meaning                                    | default                |
|----------------------------|--------------------------------------------|------------------------|
| ``MLFLOW_TRACKING_URI``    | the tracking server (``http://host:port``) | unset: nothing tracked |
| ``MLFLOW_EXPERIMENT_NAME`` | the experiment runs are filed under        | the model's name       |

Without the variable every entry point returns None and nothing is imported or contacted. With
it, train opens one MLflow run per pipeline run (found again by the ``kfp_run_id`` tag when a
task is retried), its id travels in the model artifact's metadata, and evaluate, gate and
promote write into the same run; promote registers each served version under the model's name
and points the ``champion`` alias at it. Artifacts go through the server (``mlflow server``
proxies them to its store), so the steps need no storage credentials for them.

A server that is set but unreachable is a :class:`TrackingError` naming it, before any work.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    from mlflow import MlflowClient

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
CHAMPION_ALIAS = "champion"
PIPELINE_RUN_TAG = "kfp_run_id"
RUN_ID_KEY = "mlflow_run_id"  # in the model artifact's metadata: the run evaluate etc. log into
PARAM_LIMIT = 6000  # characters MLflow keeps of a parameter's value
HEALTH_TIMEOUT_S = 10.0


class TrackingError(RuntimeError):
    """The tracking server is unreachable or refused a call; the message names it."""


def tracking_uri(env: Mapping[str, str] | None = None) -> str | None:
    """The tracking server's URI, None when tracking is off."""
    env = os.environ if env is None else env
    return env.get(TRACKING_URI_ENV, "").strip() or None


@contextmanager
def _calls(uri: str, what: str) -> Iterator[None]:
    """Turn MLflow's and the HTTP client's errors into a :class:`TrackingError` naming ``uri``."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except (MlflowException, requests.RequestException, OSError) as err:
        raise TrackingError(
            f"MLflow at {TRACKING_URI_ENV}={uri}: {what} failed ({err}). Start the server (or "
            f"correct the address), or unset {TRACKING_URI_ENV} to run without tracking."
        ) from err


def connect(uri: str) -> MlflowClient:
    """A client of ``uri``, checked first: an http(s) server must answer its ``/health``."""
    from mlflow import MlflowClient

    if uri.startswith(("http://", "https://")):
        with _calls(uri, "the health check"):
            answer = requests.get(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT_S)
            answer.raise_for_status()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"train": {"epochs": 3}}`` -> ``{"train.epochs": "3"}``; lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
            flat[name] = text[:PARAM_LIMIT]
    return flat


@dataclass(frozen=True)
class TrackedRun:
    """One MLflow run the steps of one pipeline run write into."""

    client: MlflowClient
    uri: str
    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Parameters (nested mappings flattened with dots)."""
        from mlflow.entities import Param

        flat = flatten(params)
        with _calls(self.uri, "logging parameters"):
            done = self.client.get_run(self.run_id).data.params
            new = [Param(k, v) for k, v in flat.items() if k not in done]  # a retry: once only
            for start in range(0, len(new), 100):  # MLflow takes 100 parameters per batch
                self.client.log_batch(self.run_id, params=new[start : start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Scalar metrics, at ``step`` (an epoch) when given."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        rows = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        with _calls(self.uri, "logging metrics"):
            for start in range(0, len(rows), 1000):
                self.client.log_batch(self.run_id, metrics=rows[start : start + 1000])

    def logged_steps(self, key: str) -> set[int]:
        """The steps of metric ``key`` already logged."""
        with _calls(self.uri, f"reading the history of {key}"):
            return {m.step for m in self.client.get_metric_history(self.run_id, key)}

    def log_artifact(self, path: Path, folder: str, name: str | None = None) -> None:
        """Upload the file ``path`` into the run's ``folder`` (as ``name`` when given)."""
        path = Path(path)
        with _calls(self.uri, f"uploading {path.name}"):
            if name is None or name == path.name:
                self.client.log_artifact(self.run_id, str(path), folder)
                return
            import tempfile

            with tempfile.TemporaryDirectory() as staging:
                renamed = Path(staging) / name
                renamed.write_bytes(path.read_bytes())
                self.client.log_artifact(self.run_id, str(renamed), folder)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        with _calls(self.uri, "setting tags"):
            self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ended (later steps may still log into it)."""
        with _calls(self.uri, "ending the run"):
            self.client.set_terminated(self.run_id, status)

    def artifact_uri(self, relative: str) -> str:
        """``runs:/<id>/<relative>``: an artifact of this run, as MLflow resolves it."""
        return f"runs:/{self.run_id}/{relative}"


def experiment_name(default: str) -> str:
    """``MLFLOW_EXPERIMENT_NAME``, else ``default`` (the model's name)."""
    return os.environ.get(EXPERIMENT_ENV, "").strip() or default


def start_run(
    experiment: str, run_name: str, pipeline_run_id: str | None = None
) -> TrackedRun | None:
    """The run of this pipeline run in ``experiment`` (``MLFLOW_EXPERIMENT_NAME`` overrides):
    an existing one tagged with ``pipeline_run_id`` (a retried task), else a new one. None when
    tracking is off."""
    uri = tracking_uri()
    if uri is None:
        return None
    client = connect(uri)
    name = experiment_name(experiment)
    with _calls(uri, f"opening experiment {name!r}"):
        found = client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else _create_experiment(client, name)
        if pipeline_run_id:
            query = f"tags.{PIPELINE_RUN_TAG} = '{pipeline_run_id}'"
            earlier = client.search_runs([experiment_id], query, max_results=1)
            if earlier:
                client.update_run(earlier[0].info.run_id, status="RUNNING")
                return TrackedRun(client, uri, earlier[0].info.run_id)
        tags = {PIPELINE_RUN_TAG: pipeline_run_id} if pipeline_run_id else {}
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    return TrackedRun(client, uri, run.info.run_id)


def _create_experiment(client: MlflowClient, name: str) -> str:
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by another run
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def attach_run(run_id: str | None) -> TrackedRun | None:
    """The run train opened (its id from the model's metadata); None when tracking is off or
    the model was trained without it."""
    uri = tracking_uri()
    if uri is None or not run_id:
        return None
    return TrackedRun(connect(uri), uri, run_id)


@dataclass(frozen=True)
class RegisteredVersion:
    """A model version in the MLflow registry, with the tags promote gave it."""

    model_name: str
    number: str  # MLflow's version number ("1", "2", ...)
    source: str
    tags: dict[str, str]


def register_version(
    model_name: str,
    storage_uri: str,
    tags: Mapping[str, Any],
    run_id: str | None = None,
    alias: str = CHAMPION_ALIAS,
) -> RegisteredVersion | None:
    """Register ``storage_uri`` as a new version of ``model_name`` (created on first use) with
    ``tags``, and point ``alias`` at it. None when tracking is off."""
    uri = tracking_uri()
    if uri is None:
        return None
    from mlflow.exceptions import MlflowException

    client = connect(uri)
    text_tags = {k: str(v) for k, v in tags.items() if v is not None}
    with _calls(uri, f"registering {storage_uri} as a version of {model_name!r}"):
        try:
            client.create_registered_model(model_name)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            model_name, storage_uri, run_id=run_id, tags=text_tags
        )
        client.set_registered_model_alias(model_name, alias, version.version)
    return RegisteredVersion(model_name, str(version.version), storage_uri, text_tags)


def aliased_version(model_name: str, alias: str = CHAMPION_ALIAS) -> RegisteredVersion | None:
    """The version ``alias`` points at; None when there is none (or tracking is off)."""
    uri = tracking_uri()
    if uri is None:
        return None
    from mlflow.exceptions import MlflowException

    client = connect(uri)
    with _calls(uri, f"reading {model_name!r}@{alias}"):
        try:
            version = client.get_model_version_by_alias(model_name, alias)
        except MlflowException as err:
            if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
    return RegisteredVersion(model_name, str(version.version), version.source, dict(version.tags))

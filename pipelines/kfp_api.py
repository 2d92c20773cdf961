"""The pipeline on a Kubeflow Pipelines server, through ``kfp.Client``: upload, run, schedule.

Everything here takes a connected ``kfp.Client`` (see :func:`connect`) and returns small records
that the command line prints. Only the v2beta1 REST API is used.

Recurring runs that always use the latest pipeline version: the API documents
``PipelineVersionReference.pipeline_version_id`` as optional ("If unset, the latest pipeline
version is used"), resolved by the server at every trigger (KFP backend 2.5+, kubeflow/pipelines
#11560). ``kfp.Client.create_recurring_run`` insists on a version id (kubeflow/pipelines #11441),
so :func:`schedule` sends the request through the client's generated ``recurring_runs`` API with
a pipeline id only.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kfp
import kfp_server_api
import yaml

# the pipeline parameter that turns on the "stop early when the data did not change" check
NEW_DATA_CHECK = "skip_if_unchanged"


class KfpError(RuntimeError):
    """A request that cannot be made as asked (the message says what to do)."""


@dataclass(frozen=True)
class Connection:
    """Where the KFP API is and how to authenticate to it.

    ``host``: the KFP endpoint (``http://localhost:8080`` through a port-forward of
    ``ml-pipeline-ui``, ``https://kubeflow.example.com/pipeline`` behind the central dashboard);
    unset inside a cluster pod, where ``kfp.Client`` finds the in-cluster service and the
    projected service-account token itself. ``token``: a bearer token (e.g. ``kubectl create
    token``). ``namespace``: the Kubeflow profile namespace of a multi-user installation.
    """

    host: str | None = None
    token: str | None = None
    namespace: str | None = None
    ui_host: str | None = None
    verify_ssl: bool = True

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **given: Any) -> Connection:
        """Flags (``given``, ``None`` = not given) over ``KFP_HOST``/``KF_PIPELINES_ENDPOINT``,
        ``KFP_TOKEN`` (or a file named by ``KFP_TOKEN_FILE``), ``KFP_NAMESPACE``,
        ``KF_PIPELINES_UI_ENDPOINT``."""
        env = os.environ if env is None else env
        token = given.get("token") or env.get("KFP_TOKEN") or None
        token_file = given.get("token_file") or env.get("KFP_TOKEN_FILE")
        if not token and token_file:
            token = Path(token_file).read_text().strip()
        return cls(
            host=given.get("host") or env.get("KFP_HOST") or env.get("KF_PIPELINES_ENDPOINT"),
            token=token,
            namespace=given.get("namespace") or env.get("KFP_NAMESPACE") or None,
            ui_host=given.get("ui_host") or env.get("KF_PIPELINES_UI_ENDPOINT"),
            verify_ssl=given.get("verify_ssl", True),
        )

    def ui_url(self, fragment: str) -> str:
        """A link into the KFP UI (``fragment`` like ``runs/details/<id>``)."""
        base = (self.ui_host or self.host or "").rstrip("/")
        return f"{base}/#/{fragment}"


class _Client(kfp.Client):
    """``kfp.Client`` whose start-up health check fails at once with the server's answer.

    (kfp's own asks 5 times, 5 s apart, logs each failure with a traceback and ends with a
    timeout that hides a 401.)
    """

    def get_kfp_healthz(self, sleep_duration: int = 5) -> kfp_server_api.V2beta1GetHealthzResponse:
        return self._healthz_api.healthz_service_get_healthz()


def connect(connection: Connection) -> kfp.Client:
    """A ``kfp.Client`` for ``connection`` (it asks the server's healthz on the way)."""
    if not connection.host and not os.environ.get("KUBERNETES_SERVICE_HOST"):
        raise KfpError(
            "no KFP host: pass --host or set KFP_HOST, e.g. http://localhost:8080 after "
            "`kubectl -n kubeflow port-forward svc/ml-pipeline-ui 8080:80`"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP v2.0.0-beta.2+"
        client = _Client(
            host=connection.host,
            existing_token=connection.token,
            ui_host=connection.ui_host,
            verify_ssl=connection.verify_ssl,
        )
    return client


# -- pipeline specs -------------------------------------------------------------------------------


def read_package(package: Path) -> dict:
    """The pipeline spec (first YAML document) of a compiled package."""
    return next(yaml.safe_load_all(package.read_text()))


def input_parameters(spec: Mapping) -> dict[str, dict]:
    """The root input parameters of a pipeline spec.

    Accepts a compiled package's first document and what the API returns for a pipeline version
    (``{"pipeline_spec": ..., "platform_spec": ...}`` when the YAML had a platform section).
    """
    spec = spec.get("pipeline_spec", spec)
    return dict(spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {}))


def cached_tasks(spec: Mapping) -> list[str]:
    """Tasks (in the root DAG and inside conditions) that KFP may answer from its cache."""
    spec = spec.get("pipeline_spec", spec)
    dags = [spec.get("root", {}).get("dag", {})]
    dags += [c["dag"] for c in spec.get("components", {}).values() if "dag" in c]
    return sorted(
        name
        for dag in dags
        for name, task in dag.get("tasks", {}).items()
        if task.get("cachingOptions", {}).get("enableCache")
    )


def normalize_cron(expression: str) -> str:
    """KFP's cron has six fields (seconds first); a classic five-field line gets ``0`` seconds."""
    expression = " ".join(expression.split())
    if expression.startswith("@"):
        return expression  # @every 24h, @daily, ...
    fields = expression.split(" ")
    if len(fields) == 5:
        return f"0 {expression}"
    if len(fields) == 6:
        return expression
    raise KfpError(
        f"cron expression {expression!r}: expected 6 fields (sec min hour dom month dow, e.g. "
        "'0 0 3 * * *'), 5 classic fields, or @daily / @every 24h"
    )


def default_version_name(package: Path, now: datetime | None = None) -> str:
    """``<UTC time>-<first 8 hex of the package's sha256>``: unique, sortable, content-tied."""
    digest = hashlib.sha256(package.read_bytes()).hexdigest()[:8]
    return f"{(now or datetime.now(UTC)):%Y%m%d-%H%M%S}-{digest}"


# -- server operations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Uploaded:
    pipeline_id: str
    version_id: str
    version_name: str
    new_pipeline: bool


@dataclass(frozen=True)
class Scheduled:
    recurring_run_id: str
    pipeline_id: str
    cron: str
    parameters: dict[str, Any]
    replaced: str | None  # the id of the recurring run it replaced
    version_spec: dict  # the spec of the version that is latest now
    pinned_version: str | None  # None: the latest version at every trigger


def _equals_filter(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})


def find_pipeline(client: kfp.Client, name: str, namespace: str | None = None):
    """The pipeline whose display name is ``name``, or ``None``."""
    found = client.list_pipelines(
        filter=_equals_filter("display_name", name), namespace=namespace, page_size=2
    )
    matches = [p for p in found.pipelines or [] if p.display_name == name]
    if len(matches) > 1:
        raise KfpError(f"{len(matches)} pipelines are named {name!r}; delete or rename one")
    return matches[0] if matches else None


def latest_version(client: kfp.Client, pipeline_id: str):
    """The newest version of a pipeline, or ``None``."""
    found = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
    return (found.pipeline_versions or [None])[0]


def upload(
    client: kfp.Client,
    package: Path,
    pipeline_name: str,
    version_name: str | None = None,
    description: str | None = None,
    namespace: str | None = None,
) -> Uploaded:
    """Upload ``package`` as a new version of ``pipeline_name``, creating the pipeline if absent."""
    existing = find_pipeline(client, pipeline_name, namespace)
    if existing is None:
        created = client.upload_pipeline(
            str(package), pipeline_name=pipeline_name, description=description, namespace=namespace
        )
        version = latest_version(client, created.pipeline_id)
        if version is None:
            raise KfpError(f"pipeline {created.pipeline_id} was created without a version")
        return Uploaded(
            created.pipeline_id, version.pipeline_version_id, version.display_name, True
        )
    version = client.upload_pipeline_version(
        str(package),
        pipeline_version_name=version_name or default_version_name(package),
        pipeline_id=existing.pipeline_id,
        description=description,
    )
    return Uploaded(existing.pipeline_id, version.pipeline_version_id, version.display_name, False)


def submit_run(
    client: kfp.Client,
    package: Path,
    arguments: Mapping[str, Any],
    experiment: str,
    run_name: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    enable_caching: bool | None = None,
) -> str:
    """Start one run of ``package``; returns the run id."""
    spec = read_package(package)
    unknown = set(arguments) - set(input_parameters(spec))
    if unknown:
        raise KfpError(f"the pipeline has no parameter {', '.join(sorted(unknown))}")
    pipeline_name = spec["pipelineInfo"]["name"]
    result = client.create_run_from_pipeline_package(
        str(package),
        arguments=dict(arguments),
        run_name=run_name or f"{pipeline_name} {datetime.now(UTC):%Y-%m-%d %H:%M:%S}",
        experiment_name=experiment,
        namespace=namespace,
        service_account=service_account,
        enable_caching=enable_caching,
    )
    return result.run_id


def find_recurring_run(client: kfp.Client, name: str, experiment_id: str, namespace: str | None):
    found = client.list_recurring_runs(
        experiment_id=experiment_id,
        namespace=namespace,
        filter=_equals_filter("display_name", name),
        page_size=2,
    )
    return next((r for r in found.recurring_runs or [] if r.display_name == name), None)


def schedule_arguments(spec: Mapping, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The parameters of a scheduled run: ``arguments``, plus the new-data check when the pipeline
    has it (and it was not set explicitly). Unknown parameters are an error."""
    parameters = input_parameters(spec)
    unknown = set(arguments) - set(parameters)
    if unknown:
        raise KfpError(f"the latest pipeline version has no parameter {', '.join(sorted(unknown))}")
    result = dict(arguments)
    if NEW_DATA_CHECK in parameters:
        result.setdefault(NEW_DATA_CHECK, True)
    return result


def schedule(
    client: kfp.Client,
    pipeline_name: str,
    cron: str,
    arguments: Mapping[str, Any],
    experiment: str,
    name: str,
    namespace: str | None = None,
    service_account: str | None = None,
    max_concurrency: int = 1,
    replace: bool = False,
    pin_version: bool = False,
) -> Scheduled:
    """A recurring run of the latest version of ``pipeline_name``, resolved at each trigger
    (``pin_version``: the version that is latest now, for backends older than KFP 2.5)."""
    pipeline = find_pipeline(client, pipeline_name, namespace)
    if pipeline is None:
        raise KfpError(
            f"no pipeline named {pipeline_name!r} on the server: `python -m pipelines upload` first"
        )
    version = latest_version(client, pipeline.pipeline_id)
    if version is None:
        raise KfpError(f"pipeline {pipeline_name!r} has no version: upload one first")
    version_spec = version.pipeline_spec or {}
    parameters = schedule_arguments(version_spec, arguments)
    experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    replaced = None
    existing = find_recurring_run(client, name, experiment_id, namespace)
    if existing is not None:
        if not replace:
            raise KfpError(
                f"recurring run {name!r} already exists ({existing.recurring_run_id}): pass "
                "--replace to delete and recreate it, or choose another --name"
            )
        client.delete_recurring_run(existing.recurring_run_id)
        replaced = existing.recurring_run_id
    body = kfp_server_api.V2beta1RecurringRun(
        display_name=name,
        description=f"Scheduled retraining of {pipeline_name} (latest pipeline version).",
        experiment_id=experiment_id,
        namespace=namespace,
        # a pipeline id without a version id: the server runs the latest version at every trigger
        pipeline_version_reference=kfp_server_api.V2beta1PipelineVersionReference(
            pipeline_id=pipeline.pipeline_id,
            pipeline_version_id=version.pipeline_version_id if pin_version else None,
        ),
        runtime_config=kfp_server_api.V2beta1RuntimeConfig(parameters=parameters),
        trigger=kfp_server_api.V2beta1Trigger(
            cron_schedule=kfp_server_api.V2beta1CronSchedule(cron=normalize_cron(cron))
        ),
        mode=kfp_server_api.RecurringRunMode.ENABLE,
        max_concurrency=max_concurrency,
        no_catchup=True,  # after a pause, one run, not one per missed slot
        service_account=service_account,
    )
    created = client.recurring_runs.recurring_run_service_create_recurring_run(recurring_run=body)
    return Scheduled(
        created.recurring_run_id,
        pipeline.pipeline_id,
        normalize_cron(cron),
        parameters,
        replaced,
        version_spec,
        version.pipeline_version_id if pin_version else None,
    )


def schedule_warnings(scheduled: Scheduled) -> list[str]:
    """What a user should know about a new schedule: no new-data check in the pipeline, or a
    cached ingest that would never see new images."""
    warnings = []
    if NEW_DATA_CHECK not in scheduled.parameters:
        warnings.append(
            f"note: the pipeline has no `{NEW_DATA_CHECK}` parameter yet, so every scheduled run "
            "retrains"
        )
    if "ingest" in cached_tasks(scheduled.version_spec):
        warnings.append(
            "warning: ingest is cached in the latest version (--cache-ingest): scheduled runs "
            "with the same `source` reuse the first dataset and never see new images; upload "
            "a version compiled without --cache-ingest"
        )
    return warnings

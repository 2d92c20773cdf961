"""An in-process fake of the Kubeflow Pipelines v2beta1 REST API, for driving the real kfp.Client.

A real KFP API server needs Kubernetes, Argo and MySQL; this is a small ``http.server`` on
127.0.0.1 that implements only what ``python -m pipelines upload|run|schedule`` and the listings
of the ``kfp`` CLI call, with the server-side behaviour they depend on:

- ``GET  /apis/v2beta1/healthz``
- ``GET  /apis/v2beta1/pipelines`` (``filter`` on ``display_name``), ``POST .../pipelines/upload``
  and ``.../pipelines/upload_version`` (multipart ``uploadfile``: creates a pipeline and its first
  version / a new version; the stored spec is returned as the real server does: the pipeline spec,
  or ``{"pipeline_spec": ..., "platform_spec": ...}`` when the YAML has a platform section)
- ``GET  /apis/v2beta1/pipelines/{id}/versions`` (``sort_by=created_at desc``, ``page_size``)
- ``GET|POST /apis/v2beta1/experiments``
- ``GET|POST /apis/v2beta1/runs``: a run needs an inline spec or a version reference; unknown or
  missing required parameters are rejected (400), as the API server does
- ``GET|POST /apis/v2beta1/recurringruns`` (the list's JSON key is ``recurringRuns``, as the
  server's proto declares), ``DELETE .../recurringruns/{id}``: a reference
  without a version id is accepted and resolved to the latest version (KFP 2.5+), and the
  parameters are validated against that version

Every request is recorded (:attr:`FakeKfpApi.requests`) so tests can assert what kfp.Client sent.
With ``token`` set, requests without ``Authorization: Bearer <token>`` get a 401.
"""

from __future__ import annotations

import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

API = "/apis/v2beta1"


@dataclass
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    files: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # field -> (filename, data)

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _stored_spec(text: str) -> dict:
    """What the API server returns as a version's ``pipeline_spec`` for an uploaded YAML."""
    docs = [d for d in yaml.safe_load_all(text) if d]
    if not docs or "pipelineInfo" not in docs[0]:
        raise ApiError(400, "Failed to parse the pipeline spec: no pipelineInfo")
    platform = next((d for d in docs[1:] if "platforms" in d), None)
    return {"pipeline_spec": docs[0], "platform_spec": platform} if platform else docs[0]


def _root_parameters(spec: dict) -> dict[str, dict]:
    spec = spec.get("pipeline_spec", spec)
    return spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})


def _matches(item: dict, filter_json: str | None) -> bool:
    if not filter_json:
        return True
    for predicate in json.loads(filter_json).get("predicates", []):
        if predicate.get("operation") not in ("EQUALS", 1):  # enum name or number
            raise ApiError(400, f"fake supports EQUALS filters only, got {predicate}")
        value = predicate.get("stringValue", predicate.get("string_value"))
        if item.get(predicate["key"]) != value:
            return False
    return True


class FakeKfpApi:
    """Start with ``with FakeKfpApi() as api:``; ``api.url`` is the host for ``kfp.Client``."""

    def __init__(self, token: str | None = None, multi_user: bool = False) -> None:
        self.token = token
        self.multi_user = multi_user
        self.requests: list[Recorded] = []
        self.pipelines: dict[str, dict] = {}
        self.versions: dict[str, list[dict]] = {}  # pipeline id -> versions, oldest first
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self._clock = datetime(2025, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeKfpApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def requests_to(self, method: str, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.method == method and r.path == API + path]

    # -- state helpers ----------------------------------------------------------------------------

    def _now(self) -> str:
        self._clock += timedelta(seconds=1)  # strictly increasing: "latest" is well defined
        return self._clock.strftime("%Y-%m-%dT%H:%M:%SZ")

    def _add_version(self, pipeline_id: str, name: str, description: str, text: str) -> dict:
        if any(v["display_name"] == name for v in self.versions[pipeline_id]):
            raise ApiError(409, f"pipeline version {name!r} already exists")
        version = {
            "pipeline_id": pipeline_id,
            "pipeline_version_id": str(uuid.uuid4()),
            "name": name,
            "display_name": name,
            "description": description,
            "created_at": self._now(),
            "pipeline_spec": _stored_spec(text),
        }
        self.versions[pipeline_id].append(version)
        return version

    def _latest(self, pipeline_id: str) -> dict:
        if not self.versions.get(pipeline_id):
            raise ApiError(404, f"pipeline {pipeline_id} has no version")
        return self.versions[pipeline_id][-1]

    def _spec_for(self, body: dict) -> tuple[dict, str | None]:
        """The spec a run or recurring run will execute, and the resolved version id (if any)."""
        if body.get("pipeline_spec"):
            return body["pipeline_spec"], None
        reference = body.get("pipeline_version_reference") or {}
        pipeline_id = reference.get("pipeline_id")
        if pipeline_id not in self.pipelines:
            raise ApiError(400, "a pipeline spec or a pipeline version reference is required")
        version_id = reference.get("pipeline_version_id")
        if not version_id:
            return self._latest(pipeline_id)["pipeline_spec"], None
        version = next(
            (v for v in self.versions[pipeline_id] if v["pipeline_version_id"] == version_id), None
        )
        if version is None:
            raise ApiError(404, f"pipeline version {version_id} not found")
        return version["pipeline_spec"], version_id

    @staticmethod
    def _check_parameters(spec: dict, body: dict) -> None:
        given = (body.get("runtime_config") or {}).get("parameters") or {}
        declared = _root_parameters(spec)
        unknown = set(given) - set(declared)
        if unknown:
            raise ApiError(400, f"unrecognized input parameter(s): {sorted(unknown)}")
        missing = [n for n, d in declared.items() if not d.get("isOptional") and n not in given]
        if missing:
            raise ApiError(400, f"missing required input parameter(s): {missing}")

    # -- endpoints --------------------------------------------------------------------------------

    def handle(self, request: Recorded) -> tuple[int, Any]:
        routes = [
            ("GET", r"/healthz", self._healthz),
            ("GET", r"/pipelines", self._list_pipelines),
            ("POST", r"/pipelines/upload", self._upload_pipeline),
            ("POST", r"/pipelines/upload_version", self._upload_version),
            ("GET", r"/pipelines/(?P<pid>[^/]+)/versions", self._list_versions),
            ("GET", r"/experiments", self._list_experiments),
            ("POST", r"/experiments", self._create_experiment),
            ("GET", r"/runs", self._list_runs),
            ("POST", r"/runs", self._create_run),
            ("GET", r"/recurringruns", self._list_recurring_runs),
            ("POST", r"/recurringruns", self._create_recurring_run),
            ("DELETE", r"/recurringruns/(?P<rid>[^/]+)", self._delete_recurring_run),
        ]
        if self.token and request.headers.get("authorization") != f"Bearer {self.token}":
            raise ApiError(401, "Unauthenticated: missing or wrong bearer token")
        for method, pattern, endpoint in routes:
            match = re.fullmatch(API + pattern, request.path)
            if match and method == request.method:
                return 200, endpoint(request, **match.groupdict())
        raise ApiError(404, f"fake KFP API: no route for {request.method} {request.path}")

    def _healthz(self, request: Recorded) -> dict:
        return {"multi_user": self.multi_user, "pipeline_store": "database"}

    def _page(self, items: list[dict], request: Recorded, key: str) -> dict:
        items = [i for i in items if _matches(i, request.query.get("filter"))]
        if request.query.get("sort_by", "").endswith(" desc"):
            items = items[::-1]
        size = int(request.query.get("page_size") or 0) or len(items)
        return {key: items[:size], "total_size": len(items)}

    def _list_pipelines(self, request: Recorded) -> dict:
        namespace = request.query.get("namespace")
        items = [p for p in self.pipelines.values() if not namespace or p["namespace"] == namespace]
        return self._page(items, request, "pipelines")

    def _upload_pipeline(self, request: Recorded) -> dict:
        filename, data = request.files["uploadfile"]
        if not filename.endswith((".yaml", ".yml", ".zip", ".tar.gz", ".tgz", ".json")):
            raise ApiError(400, f"unexpected package file name {filename!r}")
        name = request.query.get("display_name") or request.query.get("name") or filename
        if any(p["display_name"] == name for p in self.pipelines.values()):
            raise ApiError(409, f"pipeline {name!r} already exists")
        pipeline = {
            "pipeline_id": str(uuid.uuid4()),
            "name": name,
            "display_name": name,
            "description": request.query.get("description", ""),
            "namespace": request.query.get("namespace", ""),
            "created_at": self._now(),
        }
        self.pipelines[pipeline["pipeline_id"]] = pipeline
        self.versions[pipeline["pipeline_id"]] = []
        self._add_version(pipeline["pipeline_id"], name, pipeline["description"], data.decode())
        return pipeline

    def _upload_version(self, request: Recorded) -> dict:
        pipeline_id = request.query.get("pipelineid")
        if pipeline_id not in self.pipelines:
            raise ApiError(404, f"pipeline {pipeline_id} not found")
        _, data = request.files["uploadfile"]
        name = request.query.get("display_name") or request.query.get("name")
        return self._add_version(
            pipeline_id, name, request.query.get("description", ""), data.decode()
        )

    def _list_versions(self, request: Recorded, pid: str) -> dict:
        if pid not in self.pipelines:
            raise ApiError(404, f"pipeline {pid} not found")
        return self._page(list(self.versions[pid]), request, "pipeline_versions")

    def _list_experiments(self, request: Recorded) -> dict:
        return self._page(list(self.experiments.values()), request, "experiments")

    def _create_experiment(self, request: Recorded) -> dict:
        body = request.json
        experiment = {
            "experiment_id": str(uuid.uuid4()),
            "display_name": body["display_name"],
            "description": body.get("description") or "",
            "namespace": body.get("namespace") or "",
            "created_at": self._now(),
            "storage_state": "AVAILABLE",
        }
        self.experiments[experiment["experiment_id"]] = experiment
        return experiment

    def _list_runs(self, request: Recorded) -> dict:
        return self._page(list(self.runs.values()), request, "runs")

    def _create_run(self, request: Recorded) -> dict:
        body = request.json
        if body.get("experiment_id") not in self.experiments:
            raise ApiError(400, "unknown experiment")
        spec, _ = self._spec_for(body)
        self._check_parameters(spec, body)
        run = {**body, "run_id": str(uuid.uuid4()), "state": "PENDING", "created_at": self._now()}
        self.runs[run["run_id"]] = run
        return run

    def _list_recurring_runs(self, request: Recorded) -> dict:
        items = list(self.recurring_runs.values())
        if request.query.get("experiment_id"):
            items = [r for r in items if r["experiment_id"] == request.query["experiment_id"]]
        return self._page(items, request, "recurringRuns")  # sic: the API's JSON name

    def _create_recurring_run(self, request: Recorded) -> dict:
        body = request.json
        if body.get("experiment_id") not in self.experiments:
            raise ApiError(400, "unknown experiment")
        trigger = body.get("trigger") or {}
        if not (trigger.get("cron_schedule") or trigger.get("periodic_schedule")):
            raise ApiError(400, "a recurring run needs a cron or periodic trigger")
        spec, _ = self._spec_for(body)
        self._check_parameters(spec, body)
        recurring = {
            **body,
            "recurring_run_id": str(uuid.uuid4()),
            "status": "ENABLED" if body.get("mode") == "ENABLE" else "DISABLED",
            "created_at": self._now(),
        }
        self.recurring_runs[recurring["recurring_run_id"]] = recurring
        return recurring

    def _delete_recurring_run(self, request: Recorded, rid: str) -> dict:
        if self.recurring_runs.pop(rid, None) is None:
            raise ApiError(404, f"recurring run {rid} not found")
        return {}

    # -- HTTP plumbing ----------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                request = Recorded(
                    method=self.command,
                    path=parts.path,
                    query={k: v[-1] for k, v in parse_qs(parts.query).items()},
                    headers={k.lower(): v for k, v in self.headers.items()},
                    body=body,
                )
                content_type = self.headers.get("Content-Type", "")
                if content_type.startswith("multipart/form-data"):
                    request.files = _multipart_files(content_type, body)
                    request.body = b""
                with fake._lock:
                    fake.requests.append(request)
                    try:
                        status, payload = fake.handle(request)
                    except ApiError as error:
                        status = error.status
                        payload = {"error": str(error), "message": str(error), "code": status}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

        return Handler


def _multipart_files(content_type: str, body: bytes) -> dict[str, tuple[str, bytes]]:
    message = BytesParser(policy=HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    files = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        files[name] = (part.get_filename() or "", part.get_payload(decode=True))
    return files

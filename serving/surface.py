"""What the model server exposes, and how it answers where plain KServe would not tell the truth.

* The model-repository API (``/v2/repository/models/<name>/load|unload``, and gRPC's
  ``RepositoryModelLoad/Unload``) is closed: :class:`ClosedModelRepository` answers 403 (gRPC
  PERMISSION_DENIED). Unauthenticated, one ``unload`` would remove the model for good. A
  model is changed by rolling out a new InferenceService, never through the pod.
  ``--enable_model_repository_api`` opens it (trusted networks only).
* Readiness tells the truth: :class:`ServingDataPlane` is ready only while every registered
  model is loaded and there is at least one (KServe's answers ready with none), so Kubernetes
  stops routing to a pod that cannot answer.
* :class:`RestFrontMiddleware` reads what KServe's REST layer mishandles: a ``model_version``
  (query or ``/versions/<v>`` path) is served when it is the loaded version and is a 404 naming
  the loaded one otherwise (KServe: 501 for any); a v2 body in the binary extension is checked
  and rewritten (:func:`serving.protocol.read_binary_extension`: malformed ones get 400, not
  500); a v2 JSON body without ``Content-Type`` is read as JSON, as the protocol says.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from grpc_interceptor.exceptions import PermissionDenied
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER
from kserve.errors import InvalidInput
from kserve.logging import logger
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.infer_type import InferInput, InferRequest, RequestedOutput
from kserve.protocol.model_repository_extension import ModelRepositoryExtension

from serving.limits import ASGIApp, Receive, Scope, Send, header, replay, respond
from serving.protocol import BINARY_HEADER, BadRequest, read_binary_extension

REPOSITORY_FLAG = "--enable_model_repository_api"
VERSIONED = re.compile(r"^(?P<model>/v2/models/[^/]+)/versions/(?P<version>[^/]+)(?P<rest>/.*)?$")
V2_INFER = re.compile(r"^/v2/models/[^/]+/infer$")


class RepositoryApiDisabled(PermissionDenied):
    """The model-repository API is closed on this server."""

    def __init__(self) -> None:
        super().__init__(
            "the model repository API (load/unload) is disabled on this server: models change "
            f"by rolling out a new InferenceService ({REPOSITORY_FLAG} opens it)"
        )


class ClosedModelRepository(ModelRepositoryExtension):
    """A repository extension whose ``load`` and ``unload`` always refuse."""

    async def load(self, model_name: str) -> None:
        raise RepositoryApiDisabled()

    async def unload(self, model_name: str) -> None:
        raise RepositoryApiDisabled()


async def bad_request_handler(request: Any, exc: BadRequest) -> JSONResponse:
    """A refused request: 400 with its reason, and one log line (no traceback)."""
    logger.info("400 %s %s: %s", request.method, request.url.path, exc.reason)
    return JSONResponse(status_code=400, content={"error": exc.reason})


async def repository_disabled_handler(_: Any, exc: RepositoryApiDisabled) -> JSONResponse:
    return JSONResponse(status_code=403, content={"error": exc.details})


def quiet_refusals(app: FastAPI) -> None:
    """Answer :class:`BadRequest` without KServe's error-level traceback per bad request
    (under a flood of bad input, formatting them cost more than refusing)."""
    app.add_exception_handler(BadRequest, bad_request_handler)


def close_model_repository(server: Any, app: FastAPI) -> None:
    """Close ``server``'s repository API (REST and gRPC); REST answers 403 through ``app``."""
    server.model_repository_extension = ClosedModelRepository(server.registered_models)
    app.add_exception_handler(RepositoryApiDisabled, repository_disabled_handler)


class ServingDataPlane(DataPlane):
    """KServe's data plane, ready only while there is a model and every model is loaded."""

    async def ready(self) -> bool:
        models = self.model_registry.get_models()
        if not models:
            return False
        for name in models:
            if not await self.model_registry.is_model_ready(name):
                return False
        return await super().ready()

    def decode_inference_request(
        self, body: bytes | Any, headers: dict[str, str], model_name: str
    ) -> InferRequest:
        """KServe's, except that a binary input keeps its bytes (``as_numpy`` reads them):
        KServe turns each into a Python list, one ``.item()`` per element (76,800 for one 160 px
        image), which cost more than the forward pass. The body was checked by
        :class:`RestFrontMiddleware` (:func:`serving.protocol.read_binary_extension`)."""
        json_length = (headers or {}).get(INFERENCE_CONTENT_LENGTH_HEADER)
        if not isinstance(body, bytes) or json_length is None:
            return super().decode_inference_request(body, headers, model_name)
        try:
            request = json.loads(body[: int(json_length)])
            offset, inputs = int(json_length), []
            for spec in request["inputs"]:
                tensor = InferInput(
                    spec["name"], spec["shape"], spec["datatype"], parameters=spec.get("parameters")
                )
                size = (spec.get("parameters") or {}).get("binary_data_size")
                if size is None:
                    tensor.data = spec["data"]
                else:
                    tensor._raw_data = body[offset : offset + size]
                    offset += size
                inputs.append(tensor)
            outputs = [
                RequestedOutput(o["name"], o.get("parameters"))
                for o in request.get("outputs") or []
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise InvalidInput(f"unreadable v2 binary request: {err}") from err
        return InferRequest(
            model_name=model_name,
            infer_inputs=inputs,
            request_id=request.get("id"),
            parameters=request.get("parameters"),
            request_outputs=outputs or None,
        )


class RestFrontMiddleware:
    """Pure ASGI middleware for the REST paths KServe mishandles (see the module doc).
    ``served_version()`` is the version of the loaded model."""

    def __init__(self, app: ASGIApp, served_version: Any) -> None:
        self.app, self.served_version = app, served_version

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v2/models/"):
            await self.app(scope, receive, send)
            return
        scope, wrong = self._route_version(scope)
        if wrong is not None:
            await respond(send, 404, wrong)
            return
        if scope.get("method") == "POST" and V2_INFER.match(scope["path"]):
            try:
                scope, receive = await self._read_v2_body(scope, receive)
            except InvalidInput as err:
                await respond(send, 400, str(err.reason))
                return
        await self.app(scope, receive, send)

    def _route_version(self, scope: Scope) -> tuple[Scope, str | None]:
        """The request without its version when that is the served one; else why not."""
        path = scope["path"]
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        asked = [value for key, value in query if key == "model_version"]
        match = VERSIONED.match(path)
        if match:
            asked.append(match["version"])
            path = match["model"] + (match["rest"] or "")
        if not asked:
            return scope, None
        served = str(self.served_version())
        for version in asked:
            if version != served:
                return scope, (
                    f"model version {version!r} is not served here: this server serves version "
                    f"{served!r} (leave model_version out to use it)"
                )
        kept = urlencode([(k, v) for k, v in query if k != "model_version"]).encode()
        return {**scope, "path": path, "raw_path": path.encode(), "query_string": kept}, None

    async def _read_v2_body(self, scope: Scope, receive: Receive) -> tuple[Scope, Receive]:
        """The v2 infer request with a body KServe reads correctly (binary extension checked
        and rewritten, JSON marked as JSON)."""
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return scope, replay(b"", receive)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        binary_length = header(scope, BINARY_HEADER.encode())
        content_type = b"application/json"
        if binary_length is not None:
            body, json_length = read_binary_extension(body, binary_length)
            if json_length is not None:
                content_type = b"application/octet-stream"
        headers = [
            (k, v)
            for k, v in scope.get("headers", [])
            if k.lower() not in (b"content-type", b"content-length", BINARY_HEADER.encode())
        ]
        headers += [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        if binary_length is not None and content_type != b"application/json":
            headers.append((BINARY_HEADER.encode(), str(json_length).encode()))
        return {**scope, "headers": headers}, replay(body, receive)

"""The model server under abuse: admission limits (429/408/413, never an OOM or a reset), the
v2 binary extension read strictly, ``-1`` batches refused, the model-repository API closed,
readiness that tells the truth, versions routed, the reference client (``tritonclient.http``)
in all its forms, and a bounded ``schemathesis`` run over the server's own OpenAPI description.

Unit tests drive the ASGI middleware with httpx; the rest start ``python -m serving`` for real.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests
from kserve.errors import InvalidInput
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from brainmri import CLASS_NAMES
from brainmri.local_servers import free_ports
from serving.limits import AdmissionLimits, AdmissionMiddleware
from serving.process import ServerProcess, serve_in_subprocess
from serving.protocol import read_binary_extension
from tests.bundles import save_tiny_bundle

MODEL = "brain-mri"
SIZE = 32
SLOTS = 2  # --max_inflight_requests of the test server
BODY_TIMEOUT_S = 2.0
MAX_PAYLOAD = 2_000_000


def png(value: int = 90, side: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (side, side), value).save(buffer, "PNG")
    return buffer.getvalue()


def binary_body(inputs: list[dict], parts: list[bytes]) -> tuple[bytes, str]:
    header = json.dumps({"inputs": inputs}).encode()
    return header + b"".join(parts), str(len(header))


def bytes_tensor(*elements: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


# -- the binary extension, read strictly ----------------------------------------------------------
def bytes_input(shape: list[int], size: int) -> dict:
    return {
        "name": "image_bytes",
        "datatype": "BYTES",
        "shape": shape,
        "parameters": {"binary_data_size": size},
    }


MALFORMED_BINARY = {
    "non-numeric header": (b'{"inputs": []}', "abc", "must be the byte length"),
    "header past the body": (b'{"inputs": []}', "999", "the body is 14 bytes"),
    "header of zero": (b'{"inputs": []}', "0", "the body is 14 bytes"),
    "header is not JSON": (b"\xff\xfe not json", "4", "are not JSON"),
    "no inputs": (b'{"outputs": []}', "15", "an 'inputs' list"),
    "input without a name": (b'{"inputs": [{"shape": [1]}]}', "28", "a string 'name'"),
}


@pytest.mark.parametrize("body, length, message", MALFORMED_BINARY.values(), ids=MALFORMED_BINARY)
def test_malformed_binary_headers_are_invalid_input(body: bytes, length: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        read_binary_extension(body, length)


def test_malformed_binary_data_is_invalid_input() -> None:
    image = png()
    element = bytes_tensor(image)
    cases = {
        "truncated BYTES": ([bytes_input([1], len(element))], [element[:-10]], "runs past the end"),
        "cut element": ([bytes_input([1], len(element) - 10)], [element[:-10]], "truncated"),
        "cut length": ([bytes_input([1], 2)], [b"\x05\x00"], "element length"),
        "count mismatch": ([bytes_input([2], len(element))], [element], "needs 2 elements"),
        "negative shape": ([bytes_input([-1], len(element))], [element], "negative dimension"),
        "trailing bytes": ([bytes_input([1], len(element))], [element, b"xx"], "2 bytes follow"),
        "bad size": ([bytes_input([1], -4)], [element], "must be a byte count"),
        "fp32 size": (
            [
                {
                    "name": "pixels",
                    "datatype": "FP32",
                    "shape": [1, 3, SIZE, SIZE],
                    "parameters": {"binary_data_size": 12},
                }
            ],
            [bytes(12)],
            "needs 12288 bytes",
        ),
    }
    for name, (inputs, parts, message) in cases.items():
        body, length = binary_body(inputs, parts)
        with pytest.raises(InvalidInput, match=message):
            read_binary_extension(body, length)
        print(f"{name}: refused")


def test_binary_bytes_become_base64_and_fp32_stays_binary() -> None:
    image, pixels = png(), np.arange(3 * SIZE * SIZE, dtype=np.float32).tobytes()
    fp32 = {
        "name": "pixels",
        "datatype": "FP32",
        "shape": [1, 3, SIZE, SIZE],
        "parameters": {"binary_data_size": len(pixels)},
    }
    already_text = base64.b64encode(image)
    element = bytes_tensor(image, already_text)
    body, length = binary_body([bytes_input([2], len(element)), fp32], [element, pixels])
    rewritten, json_length = read_binary_extension(body, length)
    request = json.loads(rewritten[:json_length])
    assert request["inputs"][0]["data"] == [already_text.decode()] * 2  # both as base64 text
    assert "binary_data_size" not in request["inputs"][0]["parameters"]
    assert rewritten[json_length:] == pixels  # the FP32 data stays binary, untouched
    only_bytes, none = read_binary_extension(
        *binary_body([bytes_input([2], len(element))], [element])
    )
    assert none is None and json.loads(only_bytes)["inputs"][0]["data"][1] == already_text.decode()


# -- admission, as ASGI middleware ----------------------------------------------------------------
async def _echo(request: StarletteRequest) -> JSONResponse:
    body = await request.body()
    if request.query_params.get("hold"):
        await asyncio.sleep(float(request.query_params["hold"]))
    return JSONResponse({"size": len(body), "sha256": hashlib.sha256(body).hexdigest()})


def limited_app(**limits: float) -> tuple[Starlette, AdmissionMiddleware, list[str]]:
    rejected: list[str] = []
    app = Starlette(routes=[Route("/echo", _echo, methods=["GET", "POST"])])
    defaults = {"max_payload_bytes": 100, "max_inflight_requests": 4, "max_inflight_bytes": 400}
    gate = AdmissionMiddleware(app, AdmissionLimits(**{**defaults, **limits}), rejected.append)
    return app, gate, rejected


async def _chunks(parts: list[bytes], pause_s: float = 0.0) -> AsyncIterator[bytes]:
    for part in parts:
        await asyncio.sleep(pause_s)
        yield part


def call(
    gate: AdmissionMiddleware, method: str, content: bytes | list[bytes] | None = None
) -> httpx.Response:
    async def run() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gate), base_url="http://test"
        ) as client:
            body = _chunks(content) if isinstance(content, list) else content
            return await client.request(method, "/echo", content=body)

    return asyncio.run(run())


def test_bodies_up_to_the_limit_pass_unchanged() -> None:
    _, gate, rejected = limited_app()
    body = bytes(range(100))
    assert call(gate, "POST", body).json() == {
        "size": 100,
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    streamed = call(gate, "POST", [body[:40], body[40:80]]).json()
    assert streamed == {"size": 80, "sha256": hashlib.sha256(body[:80]).hexdigest()}
    assert call(gate, "GET").status_code == 200 and not rejected
    assert (gate.inflight_requests, gate.inflight_bytes) == (0, 0)


def test_oversize_bodies_get_413_naming_the_limit() -> None:
    _, gate, rejected = limited_app()
    declared = call(gate, "POST", b"x" * 101)
    assert declared.status_code == 413 and "is 101 bytes" in declared.json()["error"]
    assert "limit of 100 bytes (--max_payload_bytes)" in declared.json()["error"]
    streamed = call(gate, "POST", [b"x" * 60, b"y" * 60])
    assert streamed.status_code == 413 and "exceeds 100 bytes" in streamed.json()["error"]
    assert rejected == ["payload_too_large"] * 2
    assert (gate.inflight_requests, gate.inflight_bytes) == (0, 0)
    with pytest.raises(ValueError, match="at least 1"):
        AdmissionLimits(max_payload_bytes=0, max_inflight_requests=1, max_inflight_bytes=1)


def test_an_oversize_body_whose_last_chunk_crosses_the_limit_is_answered_at_once() -> None:
    """Regression: when the body's final message crosses the limit, the refusal must not wait
    to drain a rest that never comes (uvicorn's ``receive`` then blocks until the body timeout,
    so the client sees nothing for 30 s)."""
    _, gate, rejected = limited_app()
    final = {"type": "http.request", "body": b"x" * 120, "more_body": False}
    messages = [{"type": "http.request", "body": b"{", "more_body": True}, final]
    sent: list[dict] = []

    async def receive() -> dict:
        assert messages, "the middleware read past the end of the body"
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/echo", "headers": []}
    asyncio.run(gate(scope, receive, send))
    start = sent[0]
    assert start["status"] == 413 and (b"connection", b"close") not in start["headers"]
    assert "exceeds 100 bytes" in json.loads(sent[1]["body"])["error"]
    assert rejected == ["payload_too_large"]
    assert (gate.inflight_requests, gate.inflight_bytes) == (0, 0)


def test_requests_beyond_the_serving_slots_are_shed_with_429() -> None:
    """Two slots, five requests held 0.3 s each: three are shed at once, with Retry-After; a
    probe without a body is answered meanwhile; the counts return to zero."""
    _, gate, rejected = limited_app(max_inflight_requests=2)

    async def run() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gate), base_url="http://test"
        ) as client:
            held = [client.post("/echo?hold=0.3", content=b"abc") for _ in range(5)]
            probe = asyncio.create_task(asyncio.sleep(0.05))
            answers = asyncio.gather(*held)
            await probe
            live = await client.get("/echo")
            return await answers, live

    answers, live = asyncio.run(run())
    statuses = sorted(r.status_code for r in answers)
    assert statuses == [200, 200, 429, 429, 429] and live.status_code == 200
    shed = next(r for r in answers if r.status_code == 429)
    assert shed.headers["retry-after"] == "1" and "--max_inflight_requests" in shed.json()["error"]
    assert rejected == ["overloaded"] * 3
    assert (gate.inflight_requests, gate.inflight_bytes) == (0, 0)


def test_the_byte_budget_sheds_and_a_slow_upload_holds_no_slot() -> None:
    _, gate, _ = limited_app(max_inflight_requests=1, max_inflight_bytes=100, body_timeout_s=5)

    async def run() -> tuple[httpx.Response, httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gate), base_url="http://test"
        ) as client:
            slow = asyncio.create_task(
                client.post("/echo", content=_chunks([b"a" * 50] * 2, 0.2))  # 100 bytes, slowly
            )
            await asyncio.sleep(0.3)  # its first 50 bytes are in
            fast = await client.post("/echo", content=b"b" * 40)  # 90 bytes, a slot free: served
            over = await client.post("/echo", content=b"c" * 80)  # 50 + 80 > 100 bytes
            return await slow, fast, over

    slow, fast, over = asyncio.run(run())
    assert (slow.status_code, fast.status_code) == (200, 200)
    assert over.status_code == 429 and "--max_inflight_bytes" in over.json()["error"]


def test_a_body_that_does_not_arrive_in_time_gets_408() -> None:
    _, gate, rejected = limited_app(body_timeout_s=0.3)

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gate), base_url="http://test"
        ) as client:
            return await client.post("/echo", content=_chunks([b"a", b"b", b"c"], 0.2))

    response = asyncio.run(run())
    assert response.status_code == 408 and "within 0.3 s" in response.json()["error"]
    assert rejected == ["body_timeout"]
    assert (gate.inflight_requests, gate.inflight_bytes) == (0, 0)


# -- the real server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bundle(tmp_path_factory.mktemp("bundle") / "model", SIZE, version="v7")


@dataclass(frozen=True)
class Server(ServerProcess):
    grpc_port: int = 0


@contextmanager
def start(bundle: Path, log: Path, *extra: str) -> Iterator[Server]:
    """``python -m serving`` on ``bundle`` with the test limits (and ``extra`` flags)."""
    (grpc_port,) = free_ports(1)
    args = ["--model_name", MODEL, "--model_dir", str(bundle), "--grpc_port", str(grpc_port)]
    limits = ["--max_inflight_requests", str(SLOTS), "--body_timeout_s", str(BODY_TIMEOUT_S)]
    limits += ["--max_payload_bytes", str(MAX_PAYLOAD)]
    with serve_in_subprocess([*args, *limits, *extra], log, timeout_s=90) as running:
        yield Server(
            **{f.name: getattr(running, f.name) for f in fields(running)}, grpc_port=grpc_port
        )


@pytest.fixture(scope="module")
def server(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with start(bundle, tmp_path_factory.mktemp("abuse") / "server.log") as running:
        yield running


def v1(server: ServerProcess, *images: bytes) -> requests.Response:
    instances = [{"image_bytes": {"b64": base64.b64encode(i).decode()}} for i in images]
    return requests.post(
        f"{server.url}/v1/models/{MODEL}:predict", json={"instances": instances}, timeout=30
    )


def test_the_reference_client_works_in_every_form(server: ServerProcess) -> None:
    """``tritonclient.http``: BYTES images in the binary extension (raw and base64) and in
    JSON (base64), FP32 pixels binary and JSON: every form gets labels."""
    import tritonclient.http as triton

    client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    image = png(120)
    forms = [(True, image), (True, base64.b64encode(image)), (False, base64.b64encode(image))]
    for binary, data in forms:
        tensor = triton.InferInput("image_bytes", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([data], dtype=object), binary_data=binary)
        wanted = [triton.InferRequestedOutput("label", binary_data=binary)]
        result = client.infer(MODEL, [tensor], outputs=wanted)
        label = result.as_numpy("label")[0]  # bytes when sent binary, str in JSON
        assert (label.decode() if isinstance(label, bytes) else label) in CLASS_NAMES
        assert result.get_response()["model_version"] == "v7"
    pixels = np.zeros((2, 3, SIZE, SIZE), np.float32)
    for binary in (True, False):
        tensor = triton.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels, binary_data=binary)
        result = client.infer(MODEL, [tensor])
        assert result.as_numpy("probabilities").shape == (2, len(CLASS_NAMES))


def test_malformed_binary_bodies_get_400_without_exception_types(server: ServerProcess) -> None:
    element = bytes_tensor(png())
    bodies = {
        "non-numeric header": (b'{"inputs": []}', "abc"),
        "header without inputs": (b'{"id": "x"}', "11"),
        "truncated BYTES": binary_body([bytes_input([1], len(element))], [element[:-9]]),
        "shape/data mismatch": binary_body([bytes_input([3], len(element))], [element]),
    }
    for name, (body, length) in bodies.items():
        response = requests.post(
            f"{server.url}/v2/models/{MODEL}/infer",
            data=body,
            headers={"inference-header-content-length": length},
            timeout=30,
        )
        assert response.status_code == 400, (name, response.status_code, response.text)
        assert " : " not in response.json()["error"], name  # KServe's "<Type> : <message>"


def test_minus_one_batches_are_refused(server: ServerProcess) -> None:
    """A ``-1`` batch dimension once let 40 images through a max_batch_size of 32."""
    pixels = np.zeros((40, 3, SIZE, SIZE), np.float32)
    as_json = {
        "inputs": [
            {
                "name": "pixels",
                "datatype": "FP32",
                "shape": [-1, 3, SIZE, SIZE],
                "data": pixels.ravel().tolist(),
            }
        ]
    }
    response = requests.post(f"{server.url}/v2/models/{MODEL}/infer", json=as_json, timeout=30)
    assert response.status_code == 400 and "negative dimension" in response.text
    raw = pixels.tobytes()
    fp32 = dict(as_json["inputs"][0], parameters={"binary_data_size": len(raw)})
    del fp32["data"]
    body, length = binary_body([fp32], [raw])
    response = requests.post(
        f"{server.url}/v2/models/{MODEL}/infer",
        data=body,
        headers={"inference-header-content-length": length},
        timeout=30,
    )
    assert response.status_code == 400 and "negative dimension" in response.text


def test_the_model_repository_api_is_closed(server: Server) -> None:
    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    for verb in ("unload", "load"):
        response = requests.post(f"{server.url}/v2/repository/models/{MODEL}/{verb}", timeout=10)
        assert response.status_code == 403 and "disabled" in response.json()["error"]
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=MODEL))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).status_code == 200
    assert v1(server, png()).status_code == 200  # still serving


def test_versions_are_routed_and_bad_explain_input_is_a_400(server: ServerProcess) -> None:
    base = f"{server.url}/v2/models/{MODEL}"
    assert requests.get(f"{base}/ready?model_version=v7", timeout=10).status_code == 200
    assert requests.get(f"{base}/versions/v7", timeout=10).status_code == 200
    for wrong in (f"{base}/ready?model_version=3", f"{base}/versions/v1/ready"):
        response = requests.get(wrong, timeout=10)
        assert response.status_code == 404 and "serves version 'v7'" in response.text
    explain = f"{server.url}/v1/models/{MODEL}:explain"
    response = requests.post(explain, json={}, timeout=10)
    assert response.status_code == 400 and "no 'instances' field" in response.json()["error"]
    bad = {"instances": [{"image_bytes": {"b64": "bm90IGFuIGltYWdl"}}]}
    response = requests.post(explain, json=bad, timeout=10)
    assert response.status_code == 400 and "instances[0]" in response.json()["error"]
    response = requests.post(explain, data=b"\xff{", timeout=10)
    assert 400 <= response.status_code < 500


def test_overload_is_shed_with_429_while_liveness_holds(server: ServerProcess) -> None:
    image = png(60, side=512)  # decoding takes a while: the slots fill up
    live_times: list[float] = []

    def probe() -> None:
        for _ in range(10):
            started = time.perf_counter()
            assert requests.get(f"{server.url}/v2/health/live", timeout=5).status_code == 200
            live_times.append(time.perf_counter() - started)

    with ThreadPoolExecutor(max_workers=25) as pool:
        probing = pool.submit(probe)
        answers = list(pool.map(lambda _: v1(server, *[image] * 8), range(48)))
        probing.result()
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    assert all(r.headers.get("retry-after") == "1" for r in answers if r.status_code == 429)
    assert max(live_times) < 2.0


def read_until_closed(sock: socket.socket) -> str:
    """Everything the peer sends until it closes (headers and body may arrive apart)."""
    chunks = []
    while chunk := sock.recv(4096):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_a_slow_body_gets_408_and_an_oversize_one_an_answer(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/models/{MODEL}:predict HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
        )
        answer = read_until_closed(sock)  # waits for the deadline; the server closes
    assert answer.startswith("HTTP/1.1 408") and f"within {BODY_TIMEOUT_S:g} s" in answer
    big = b"x" * (MAX_PAYLOAD + 1000)  # sent whole; answered, not reset
    response = requests.post(
        f"{server.url}/v1/models/{MODEL}:predict",
        data=big,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413


@pytest.mark.integration
def test_readiness_is_false_once_the_model_is_unloaded(bundle: Path, tmp_path: Path) -> None:
    """With the repository API opened on purpose, an unload takes readiness with it (KServe
    kept answering ready with no model)."""
    with start(bundle, tmp_path / "server.log", "--enable_model_repository_api") as running:
        url = running.url
        assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
        unload = requests.post(f"{url}/v2/repository/models/{MODEL}/unload", timeout=10)
        assert unload.status_code == 200
        assert requests.get(f"{url}/v2/health/ready", timeout=10).status_code == 503
        assert v1(running, png()).status_code == 404
        assert requests.get(f"{url}/v2/health/live", timeout=10).status_code == 200


def test_fuzzing_the_openapi_description_finds_no_server_error(
    server: ServerProcess, tmp_path: Path
) -> None:
    """A bounded schemathesis run (examples, fuzzing, stateful; 40 s) over every operation of
    ``/openapi.json``, the model name fixed so requests reach the model: no 5xx."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(f'[parameters]\nmodel_name = "{MODEL}"\n')
    command = [
        str(Path(sys.executable).with_name("st")),
        "--config-file",
        str(config),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--phases",
        "examples,fuzzing,stateful",
        "--max-examples",
        "30",
        "--max-time",
        "40",
        "--seed",
        "7",
        "--workers",
        "2",
        "--generation-database",
        "none",
        "--no-color",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "passed" in done.stdout and "server error" not in done.stdout.lower()

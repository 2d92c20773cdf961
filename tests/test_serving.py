"""The KServe predictor: the model class in-process, then the real server over HTTP and gRPC."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import secrets
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from kserve import InferInput, InferRequest, InferResponse
from kserve.errors import InvalidInput
from PIL import Image

from brainmri import CLASS_NAMES
from brainmri.demo_data import synthetic_slice
from brainmri.images import PreprocessConfig, decode_image
from brainmri.local_s3 import free_ports
from brainmri.model import ModelBundle, build_model
from brainmri.storage import ObjectStore, S3Uri, StorageError
from serving.__main__ import build_parser, main
from serving.predictor import BrainMRIModel

REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "brain-mri"
STARTUP_TIMEOUT_S = 90.0


# -- helpers -----------------------------------------------------------------------------------
def encode(label: str = "glioma", seed: int = 0, fmt: str = "PNG") -> bytes:
    """A synthetic MRI-like slice as encoded image bytes."""
    pixels = synthetic_slice(label, np.random.default_rng(seed), 64)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def v1_body(*images: bytes) -> dict:
    return {"instances": [{"image_bytes": {"b64": b64(img)}} for img in images]}


def huge_png_header() -> bytes:
    """A PNG whose header claims 20000x20000 pixels: PIL refuses it as a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def assert_valid_predictions(predictions: list[dict], count: int, version: str = "v1") -> None:
    assert len(predictions) == count
    for pred in predictions:
        assert pred["label"] in CLASS_NAMES
        probs = pred["probabilities"]
        assert list(probs) == list(CLASS_NAMES)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
        assert all(0.0 <= p <= 1.0 for p in probs.values())
        assert pred["label"] == max(probs, key=probs.get)
        assert pred["model_version"] == version


def infer(model: BrainMRIModel, body: dict | InferRequest | bytes) -> dict | InferResponse:
    response, _headers = asyncio.run(model(body, headers={}))
    return response


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained tiny_cnn bundle: enough to exercise the serving protocol."""
    model = build_model("tiny_cnn", len(CLASS_NAMES))
    bundle = ModelBundle(
        model, "tiny_cnn", list(CLASS_NAMES), PreprocessConfig(image_size=64), {"version": "v1"}
    )
    return bundle.save(tmp_path_factory.mktemp("bundle") / "model")


@pytest.fixture(scope="module")
def loaded(bundle_dir: Path) -> Iterator[BrainMRIModel]:
    model = BrainMRIModel(MODEL_NAME, str(bundle_dir), device="cpu", max_batch_size=8)
    assert model.load() is True
    yield model
    model.stop()


# -- the model class, in-process ---------------------------------------------------------------
def test_load_from_local_dir_sets_ready_and_version(bundle_dir: Path) -> None:
    model = BrainMRIModel(MODEL_NAME, f"file://{bundle_dir}", device="cpu")
    assert not model.ready
    model.load()
    assert model.ready
    assert model.model_version == "v1"
    assert model.bundle.class_names == list(CLASS_NAMES)
    model.stop()
    assert not model.ready


def test_version_falls_back_to_unknown(tmp_path: Path) -> None:
    bundle = ModelBundle(
        build_model("tiny_cnn", 4), "tiny_cnn", list(CLASS_NAMES), PreprocessConfig(image_size=32)
    )
    model = BrainMRIModel("m", str(bundle.save(tmp_path / "m")), device="cpu")
    model.load()
    assert model.model_version == "unknown"
    assert_valid_predictions(infer(model, v1_body(encode()))["predictions"], 1, "unknown")


@pytest.mark.parametrize(
    ("uri", "error", "message"),
    [
        ("/nonexistent/model", FileNotFoundError, "does not exist"),
        ("gs://bucket/model", ValueError, "unsupported storage URI"),
    ],
)
def test_load_rejects_bad_locations(uri: str, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        BrainMRIModel(MODEL_NAME, uri).load()


def test_load_from_s3(store: ObjectStore, bucket: str, bundle_dir: Path) -> None:
    store.upload_dir(bundle_dir, S3Uri(bucket, "models/brain/v1"), progress=False)
    model = BrainMRIModel(MODEL_NAME, f"s3://{bucket}/models/brain/v1", device="cpu")
    model.load()
    assert model.ready and model.model_version == "v1"
    assert_valid_predictions(infer(model, v1_body(encode()))["predictions"], 1)
    model.stop()


def test_load_from_empty_s3_prefix_says_so(bucket: str) -> None:
    with pytest.raises(StorageError, match="nothing found under"):
        BrainMRIModel(MODEL_NAME, f"s3://{bucket}/missing").load()


def test_main_exits_1_with_a_message_when_the_model_cannot_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    argv = ["--model_dir", str(tmp_path / "absent"), "--configure_logging", "false"]
    kserve_logger = logging.getLogger("kserve")  # may not propagate to the root logger
    kserve_logger.addHandler(caplog.handler)
    try:
        assert main(argv) == 1
    finally:
        kserve_logger.removeHandler(caplog.handler)
    assert "Cannot load model" in caplog.text and "does not exist" in caplog.text


def test_load_rejects_a_directory_without_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a saved model"):
        BrainMRIModel(MODEL_NAME, str(tmp_path)).load()


def test_v1_batch_runs_as_one_forward_pass(loaded: BrainMRIModel) -> None:
    batch_sizes: list[int] = []
    hook = loaded.bundle.model.register_forward_hook(
        lambda _module, inputs, _output: batch_sizes.append(inputs[0].shape[0])
    )
    try:
        images = [encode(label, seed) for seed, label in enumerate(CLASS_NAMES)]
        images.append(encode("glioma", 9, fmt="JPEG"))
        response = infer(loaded, v1_body(*images))
    finally:
        hook.remove()
    assert batch_sizes == [5]
    assert_valid_predictions(response["predictions"], 5)


def test_v1_predictions_match_the_bundle(loaded: BrainMRIModel) -> None:
    """Serving preprocesses exactly like the bundle does, in request order."""
    images = [encode("meningioma", 1), encode("pituitary", 2)]
    response = infer(loaded, v1_body(*images))
    expected = loaded.bundle.predict_images([decode_image(image) for image in images])
    for pred, row in zip(response["predictions"], expected.tolist(), strict=True):
        assert list(pred["probabilities"].values()) == pytest.approx(row, abs=1e-6)


def test_v1_accepts_line_wrapped_base64(loaded: BrainMRIModel) -> None:
    text = b64(encode())
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))
    body = {"instances": [{"image_bytes": {"b64": wrapped}}]}
    assert_valid_predictions(infer(loaded, body)["predictions"], 1)


GOOD = {"image_bytes": {"b64": b64(encode())}}


@pytest.mark.parametrize(
    ("body", "fragments"),
    [
        ({}, ["no 'instances' field"]),
        ({"inputs": []}, ["no 'instances' field"]),
        ({"instances": []}, ["'instances' is empty"]),
        ({"instances": {"image_bytes": {}}}, ["'instances' must be a list"]),
        ([GOOD], ["must be a JSON object", "got a list"]),
        (b"\x89PNG raw bytes", ["must be JSON", "application/json"]),
        ({"instances": [GOOD, 7]}, ["instances[1]", "must be an object"]),
        ({"instances": [{"image": {"b64": "x"}}]}, ["instances[0]", "no 'image_bytes' field"]),
        ({"instances": [{"image_bytes": {}}]}, ["instances[0]", "no 'image_bytes.b64' field"]),
        ({"instances": [{"image_bytes": {"b64": 5}}]}, ["instances[0]", "non-string"]),
        (
            {"instances": [GOOD, {"image_bytes": {"b64": "!!not base64!!"}}]},
            ["instances[1]", "base64"],
        ),
        ({"instances": [{"image_bytes": {"b64": ""}}]}, ["instances[0]", "empty string"]),
        (
            {"instances": [{"image_bytes": {"b64": b64(b"just text")}}]},
            ["instances[0]", "not a readable image"],
        ),
        (
            {"instances": [{"image_bytes": {"b64": b64(encode()[:60])}}]},
            ["instances[0]", "not a readable image"],
        ),
        (
            {"instances": [{"image_bytes": {"b64": b64(huge_png_header())}}]},
            ["instances[0]", "too large"],
        ),
        ({"instances": [GOOD] * 9}, ["holds 9 images", "limit of 8"]),
    ],
    ids=[
        "no-instances",
        "v2-body-on-v1",
        "empty-instances",
        "instances-not-list",
        "body-not-object",
        "raw-bytes",
        "instance-not-object",
        "no-image-bytes",
        "no-b64",
        "b64-not-string",
        "bad-base64",
        "empty-b64",
        "not-an-image",
        "truncated-image",
        "decompression-bomb",
        "too-many",
    ],
)
def test_v1_bad_input_raises_invalid_input(
    loaded: BrainMRIModel, body: object, fragments: list[str]
) -> None:
    with pytest.raises(InvalidInput) as info:
        infer(loaded, body)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_v1_reports_every_bad_instance_at_once(loaded: BrainMRIModel) -> None:
    body = {"instances": [GOOD, {"image_bytes": {"b64": "%%%"}}, GOOD, {"nope": 1}]}
    with pytest.raises(InvalidInput) as info:
        infer(loaded, body)
    message = str(info.value)
    assert "instances[1]: not valid base64" in message
    assert "instances[3]: has no 'image_bytes' field" in message
    assert "instances[0]" not in message and "instances[2]" not in message


def v2_request(data: list, shape: list[int] | None = None, datatype: str = "BYTES") -> InferRequest:
    tensor = InferInput("image_bytes", shape or [len(data)], datatype, data=data)
    return InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor], request_id="req-1")


def test_v2_base64_strings_and_raw_bytes(loaded: BrainMRIModel) -> None:
    """REST JSON carries base64 strings, gRPC raw bytes; both decode to the same answer."""
    image = encode("pituitary", 3)
    response = infer(loaded, v2_request([b64(image), image]))
    assert isinstance(response, InferResponse)
    assert response.id == "req-1" and response.model_version == "v1"
    labels = response.get_output_by_name("label")
    probs = response.get_output_by_name("probabilities")
    assert labels.shape == [2] and all(label in CLASS_NAMES for label in labels.data)
    assert probs.shape == [2, len(CLASS_NAMES)]
    assert probs.parameters["class_names"] == ",".join(CLASS_NAMES)
    matrix = np.asarray(probs.data).reshape(probs.shape)
    assert matrix.sum(axis=1) == pytest.approx([1.0, 1.0], abs=1e-5)
    assert matrix[0] == pytest.approx(matrix[1])


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (v2_request([1.0], datatype="FP32"), "expected BYTES"),
        (v2_request([b64(encode())], shape=[3]), "does not fit shape [3]"),
        (v2_request([b64(encode()), "@@"]), "image_bytes[1]: not valid base64"),
        (v2_request([b"not an image"]), "image_bytes[0]: not a readable image"),
        (v2_request([]), "is empty"),
        (
            InferRequest(
                model_name=MODEL_NAME,
                infer_inputs=[
                    InferInput("a", [1], "BYTES", ["x"]),
                    InferInput("b", [1], "BYTES", ["y"]),
                ],
            ),
            "exactly one input",
        ),
    ],
    ids=["not-bytes", "shape-mismatch", "bad-base64", "not-an-image", "empty", "two-inputs"],
)
def test_v2_bad_input_raises_invalid_input(
    loaded: BrainMRIModel, request_: InferRequest, fragment: str
) -> None:
    with pytest.raises(InvalidInput) as info:
        infer(loaded, request_)
    assert fragment in str(info.value)


def test_v2_metadata_describes_tensors(loaded: BrainMRIModel) -> None:
    assert loaded.get_input_types() == [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}]
    outputs = {o["name"]: o for o in loaded.get_output_types()}
    assert outputs["probabilities"]["shape"] == [-1, len(CLASS_NAMES)]


def test_cli_parses_kserve_and_own_flags() -> None:
    argv = ["--model_name", "x", "--storage_uri", "s3://b/m"]
    argv += ["--http_port", "9000", "--max_batch_size", "4"]
    args = build_parser().parse_args(argv)
    assert (args.model_name, args.storage_uri, args.http_port, args.max_batch_size) == (
        ("x", "s3://b/m", 9000, 4)
    )
    assert args.grpc_port == 8081  # kserve's own defaults come along
    assert build_parser().parse_args(["--model_dir", "/mnt/models"]).model_dir == "/mnt/models"
    for bad in (
        ["--model_name", "x"],  # no model location
        ["--storage_uri", "s3://b/m", "--model_dir", "/mnt/models"],  # two
        ["--model_dir", "s3://b/m"],  # --model_dir is local only
    ):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--storage_uri", "/m", "--max_batch_size", "0"])


# -- the real server, over HTTP and gRPC -------------------------------------------------------
@dataclass
class Server:
    url: str
    grpc_address: str
    process: subprocess.Popen
    log_path: Path
    startup_s: float

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def assert_alive(self) -> None:
        assert self.process.poll() is None, f"server exited:\n{self.log_tail()}"
        ready = requests.get(f"{self.url}/v2/health/ready", timeout=5)
        assert ready.status_code == 200, ready.text

    def predict(self, body: object = None, *, data: bytes | None = None, **kw) -> requests.Response:
        url = f"{self.url}/v1/models/{MODEL_NAME}:predict"
        return requests.post(url, json=body, data=data, timeout=30, **kw)


def _wait_until_ready(process: subprocess.Popen, url: str, log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            if requests.get(f"{url}/v1/models/{MODEL_NAME}", timeout=2).status_code == 200:
                return
        except requests.RequestException:  # not listening yet
            pass
        time.sleep(0.2)
    pytest.fail(f"server not ready after {STARTUP_TIMEOUT_S}s:\n{log_path.read_text()[-4000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@pytest.fixture(scope="module")
def server(
    s3_env: dict[str, str], bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """``python -m serving`` as a real subprocess, loading the bundle from the local S3 server.

    Module-scoped (one server for all HTTP tests), so it makes its own bucket rather than use the
    function-scoped ``store``/``bucket`` fixtures.
    """
    store = ObjectStore()
    bucket = f"t{secrets.token_hex(6)}"
    store.upload_dir(bundle_dir, S3Uri(bucket, "m/v1"), progress=False)
    http_port, grpc_port = free_ports(2)
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    command = [
        sys.executable,
        "-m",
        "serving",
        "--model_name",
        MODEL_NAME,
        "--storage_uri",
        f"s3://{bucket}/m/v1",
        "--http_port",
        str(http_port),
        "--grpc_port",
        str(grpc_port),
    ]
    url = f"http://127.0.0.1:{http_port}"
    with log_path.open("wb") as log:
        started = time.monotonic()
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, **s3_env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_until_ready(process, url, log_path)
        yield Server(url, f"127.0.0.1:{grpc_port}", process, log_path, time.monotonic() - started)
    finally:
        _stop(process)


def test_server_starts_from_s3_and_reports_ready(server: Server) -> None:
    print(f"server ready {server.startup_s:.1f}s after spawn")
    server.assert_alive()
    body = requests.get(f"{server.url}/v1/models/{MODEL_NAME}", timeout=5).json()
    assert body == {"name": MODEL_NAME, "ready": True}
    meta = requests.get(f"{server.url}/v2/models/{MODEL_NAME}", timeout=5).json()
    assert meta["inputs"][0]["datatype"] == "BYTES"


def test_server_predicts_real_images(server: Server) -> None:
    response = server.predict(v1_body(encode("glioma"), encode("notumor", 4, fmt="JPEG")))
    assert response.status_code == 200, response.text
    assert_valid_predictions(response.json()["predictions"], 2)


def test_server_v2_infer(server: Server) -> None:
    body = {
        "inputs": [
            {
                "name": "image_bytes",
                "shape": [1],
                "datatype": "BYTES",
                "data": [b64(encode("meningioma"))],
            }
        ]
    }
    response = requests.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["label"]["data"][0] in CLASS_NAMES
    assert sum(outputs["probabilities"]["data"]) == pytest.approx(1.0, abs=1e-5)
    assert response.json()["model_version"] == "v1"


def test_server_grpc_infer_with_raw_bytes(server: Server) -> None:
    from kserve import InferenceGRPCClient

    async def call() -> InferResponse:
        client = InferenceGRPCClient(server.grpc_address, timeout=30)
        try:
            tensor = InferInput("image_bytes", [1], "BYTES", data=[encode("pituitary")])
            return await client.infer(InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor]))
        finally:
            await client.close()

    response = asyncio.run(call())
    labels = response.get_output_by_name("label").data
    assert [label.decode() for label in labels][0] in CLASS_NAMES


@pytest.mark.parametrize(
    ("kwargs", "status", "fragments"),
    [
        ({"body": v1_body(b"this is not an image")}, 400, ["instances[0]", "not a readable image"]),
        (
            {"body": {"instances": [{"image_bytes": {"b64": "%%%"}}]}},
            400,
            ["instances[0]", "base64"],
        ),
        ({"body": {"instances": []}}, 400, ["'instances' is empty"]),
        ({"body": {"instances": [{"image": "x"}]}}, 400, ["instances[0]", "image_bytes"]),
        (
            {"data": b'{"instances": [', "headers": {"content-type": "application/json"}},
            400,
            ["Unrecognized request format"],
        ),
        ({"data": encode(), "headers": {"content-type": "image/png"}}, 400, ["must be JSON"]),
    ],
    ids=[
        "non-image",
        "bad-base64",
        "empty-instances",
        "no-image-bytes",
        "malformed-json",
        "raw-png",
    ],
)
def test_server_rejects_bad_input_with_4xx_and_stays_up(
    server: Server, kwargs: dict, status: int, fragments: list[str]
) -> None:
    response = server.predict(
        kwargs.get("body"), data=kwargs.get("data"), headers=kwargs.get("headers")
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    for fragment in fragments:
        assert fragment in error
    server.assert_alive()


def test_server_unknown_model_is_404(server: Server) -> None:
    response = requests.post(
        f"{server.url}/v1/models/nope:predict", json=v1_body(encode()), timeout=10
    )
    assert response.status_code == 404
    assert "nope" in response.json()["error"]


def test_server_still_serves_after_errors(server: Server) -> None:
    server.predict({"instances": [{"image_bytes": {"b64": "%%%"}}]})
    response = server.predict(v1_body(encode("glioma", 7)))
    assert response.status_code == 200, response.text
    assert_valid_predictions(response.json()["predictions"], 1)


def test_server_handles_concurrent_requests(server: Server) -> None:
    bodies = [
        v1_body(*(encode(label, seed) for label in CLASS_NAMES[: 1 + seed % 4]))
        for seed in range(8)
    ]
    with ThreadPoolExecutor(max_workers=8) as pool:
        responses = list(pool.map(server.predict, bodies))
    for body, response in zip(bodies, responses, strict=True):
        assert response.status_code == 200, response.text
        assert_valid_predictions(response.json()["predictions"], len(body["instances"]))

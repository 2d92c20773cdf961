"""The KServe predictor: the model class in-process, then the real server over HTTP and gRPC."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import pickle
import random
import re
import secrets
import struct
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from kserve import InferInput, InferRequest, InferResponse
from kserve.errors import InvalidInput
from PIL import Image
from prometheus_client import REGISTRY

from brainmri import CLASS_NAMES
from brainmri.backbones import get_backbone
from brainmri.demo_data import synthetic_slice
from brainmri.demo_dicom import DemoPatient, dicom_instance
from brainmri.images import PreprocessConfig, decode_image
from brainmri.local_servers import free_ports
from brainmri.model import ModelBundle, build_model
from brainmri.storage import ObjectStore, S3Uri, StorageError
from serving import __main__ as serving_main
from serving import protocol
from serving.__main__ import build_parser, forward_threads, main
from serving.predictor import BrainMRIModel
from serving.process import ServerNotReady, ServerProcess, serve_in_subprocess
from tests.bundles import save_tiny_bundle

MODEL_NAME = "brain-mri"
STARTUP_TIMEOUT_S = 90.0
MAX_PAYLOAD_BYTES = 1_000_000  # the real server's limit in these tests


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
    model = BrainMRIModel("m", str(save_tiny_bundle(tmp_path / "m")), device="cpu")
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
    head = loaded.bundle.model.get_submodule(get_backbone(loaded.bundle.backbone).head)
    hook = head.register_forward_hook(
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
    bundle = loaded.bundle
    expected = bundle.predict_proba(
        torch.stack([bundle.preprocess(decode_image(i)) for i in images])
    )
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


def test_unexpected_decoder_errors_are_bad_input(
    loaded: BrainMRIModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PIL plugins can raise e.g. struct.error on crafted files: still a 400, not a 500."""

    def crash(_data: bytes) -> Image.Image:
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(protocol, "decode_image", crash)
    with pytest.raises(InvalidInput, match=r"instances\[0\]: not a readable image \(error: unpack"):
        infer(loaded, v1_body(encode()))


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
        (v2_request([1.0], datatype="FP64"), "has datatype FP64; expected BYTES"),
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
    assert loaded.get_input_types() == [
        {"name": "image_bytes", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 64, 64]},
    ]
    outputs = {o["name"]: o for o in loaded.get_output_types()}
    assert outputs["probabilities"]["shape"] == [-1, len(CLASS_NAMES)]


def pixels_request(pixels: np.ndarray, datatype: str = "FP32") -> InferRequest:
    tensor = InferInput("pixels", list(pixels.shape), datatype)
    tensor.set_data_from_numpy(pixels, binary_data=False)
    return InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor], request_id="req-2")


def preprocessed(model: BrainMRIModel, *images: bytes) -> np.ndarray:
    return np.stack([model.bundle.preprocess(decode_image(img)).numpy() for img in images])


def test_v2_fp32_tensors_match_encoded_images(loaded: BrainMRIModel) -> None:
    """A preprocessed FP32 batch gets the same answer as the encoded images it came from."""
    images = [encode("glioma", 5), encode("notumor", 6)]
    from_pixels = infer(loaded, pixels_request(preprocessed(loaded, *images)))
    from_bytes = infer(loaded, v2_request([b64(img) for img in images]))
    assert from_pixels.id == "req-2" and from_pixels.model_version == "v1"
    labels = from_pixels.get_output_by_name("label")
    assert labels.data == from_bytes.get_output_by_name("label").data
    probs = from_pixels.get_output_by_name("probabilities")
    assert probs.shape == [2, len(CLASS_NAMES)]
    assert probs.data == pytest.approx(from_bytes.get_output_by_name("probabilities").data)


@pytest.mark.parametrize(
    ("pixels", "datatype", "fragments"),
    [
        (np.zeros((1, 3, 32, 32), np.float32), "FP32", ["shape [1, 3, 32, 32]", "[N, 3, 64, 64]"]),
        (np.zeros((2, 64, 64), np.float32), "FP32", ["shape [2, 64, 64]", "[N, 3, 64, 64]"]),
        (np.zeros((1, 1, 64, 64), np.float32), "FP32", ["[1, 1, 64, 64]", "3 channels"]),
        (np.zeros((9, 3, 64, 64), np.float32), "FP32", ["holds 9 images", "limit of 8"]),
        (np.zeros((0, 3, 64, 64), np.float32), "FP32", ["is empty"]),
        (np.full((1, 3, 64, 64), np.nan, np.float32), "FP32", ["NaN or infinite"]),
        (np.zeros((1, 3, 64, 64), np.float64), "FP64", ["datatype FP64", "FP32", "BYTES"]),
        (np.zeros((1, 3, 64, 64), np.float16), "FP16", ["datatype FP16", "[N, 3, 64, 64]"]),
    ],
    ids=["small", "no-channels", "one-channel", "too-many", "empty", "nan", "fp64", "fp16"],
)
def test_v2_fp32_bad_tensors_name_expected_and_got(
    loaded: BrainMRIModel, pixels: np.ndarray, datatype: str, fragments: list[str]
) -> None:
    with pytest.raises(InvalidInput) as info:
        infer(loaded, pixels_request(pixels, datatype))
    for fragment in fragments:
        assert fragment in str(info.value)


def test_v2_fp32_data_that_does_not_fit_its_shape(loaded: BrainMRIModel) -> None:
    tensor = InferInput("pixels", [1, 3, 64, 64], "FP32", data=[0.0] * 10)
    request = InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor])
    with pytest.raises(InvalidInput, match="does not fit shape"):
        infer(loaded, request)


def test_image_pixel_limit_is_checked_before_decoding(bundle_dir: Path) -> None:
    model = BrainMRIModel(MODEL_NAME, str(bundle_dir), device="cpu", max_image_pixels=32 * 32)
    model.load()
    try:
        with pytest.raises(
            InvalidInput, match=r"instances\[0\]: image of 64x64 pixels is too large"
        ):
            infer(model, v1_body(encode()))
    finally:
        model.stop()


def test_declared_payload_size_over_the_limit_is_refused(bundle_dir: Path) -> None:
    model = BrainMRIModel(MODEL_NAME, str(bundle_dir), device="cpu", max_payload_bytes=1000)
    model.load()
    try:
        body = v1_body(encode())
        with pytest.raises(InvalidInput, match=r"5000 bytes.*limit of 1000 bytes"):
            asyncio.run(model(body, headers={"content-length": "5000"}))
        response, _ = asyncio.run(model(body, headers={"content-length": "900"}))
        assert_valid_predictions(response["predictions"], 1)
    finally:
        model.stop()


def test_rejections_and_batch_sizes_are_counted(loaded: BrainMRIModel) -> None:
    def sample(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, {"model_name": MODEL_NAME, **labels}) or 0.0

    rejected_before = sample("brainmri_rejected_requests_total", {"reason": "invalid_input"})
    images_before = sample("brainmri_request_images_sum", {})
    with pytest.raises(InvalidInput):
        infer(loaded, {"instances": []})
    infer(loaded, v1_body(encode(), encode()))
    assert sample("brainmri_rejected_requests_total", {"reason": "invalid_input"}) == (
        rejected_before + 1
    )
    assert sample("brainmri_request_images_sum", {}) == images_before + 2
    info = {"version": "v1", "backbone": "tiny_cnn", "image_size": "64", "runtime": "torch"}
    assert sample("brainmri_model_info", info) == 1.0


def test_model_survives_pickling_into_a_worker_process(loaded: BrainMRIModel) -> None:
    """``--workers N`` pickles the model into spawned processes; thread pools are rebuilt."""
    clone = pickle.loads(pickle.dumps(loaded))
    assert_valid_predictions(infer(clone, v1_body(encode()))["predictions"], 1)
    clone.stop()


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


def test_cli_accepts_dashed_spellings() -> None:
    """The issue's and README's ``--model-name``/``--storage-uri``, next to KServe's style."""
    argv = ["--model-name", "x", "--storage-uri", "s3://b/m", "--max-batch-size", "4"]
    argv += ["--max-payload-bytes", "1000", "--max-image-pixels", "64", "--torch-threads", "1"]
    args = build_parser().parse_args(argv)
    assert (args.model_name, args.storage_uri, args.max_batch_size) == ("x", "s3://b/m", 4)
    assert (args.max_payload_bytes, args.max_image_pixels, args.torch_threads) == (1000, 64, 1)
    assert build_parser().parse_args(["--model-dir", "/mnt/models"]).model_dir == "/mnt/models"
    assert build_parser().parse_args(["--model_dir", "/m"]).model_name == "model"  # kserve's
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--storage-uri", "s3://b/m", "--model-dir", "/mnt/models"])


def test_thread_defaults_fit_the_cpu_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serving_main, "cpu_budget", lambda: 4)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert forward_threads(cpu, None, None) == (4, 1)  # single-threaded passes side by side
    assert forward_threads(cpu, 1, None) == (1, 4)
    assert forward_threads(cpu, 3, None) == (3, 1)
    assert forward_threads(cpu, 2, 3) == (2, 3)  # flags win
    assert forward_threads(cuda, None, None) == (1, 4)


# -- the real server, over HTTP and gRPC -------------------------------------------------------
@dataclass(frozen=True)
class Server(ServerProcess):
    """The running server plus its gRPC address and the checks the tests share."""

    grpc_address: str = ""

    def assert_alive(self) -> None:
        assert self.process.poll() is None, f"server exited:\n{self.log_tail()}"
        ready = requests.get(f"{self.url}/v2/health/ready", timeout=5)
        assert ready.status_code == 200, ready.text

    def predict(self, body: object = None, *, data: bytes | None = None, **kw) -> requests.Response:
        url = f"{self.url}/v1/models/{MODEL_NAME}:predict"
        return requests.post(url, json=body, data=data, timeout=30, **kw)


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
    (grpc_port,) = free_ports(1)
    args = [
        "--model-name",  # the dashed spellings of the issue and README
        MODEL_NAME,
        "--storage-uri",
        f"s3://{bucket}/m/v1",
        "--grpc_port",
        str(grpc_port),
        "--max_payload_bytes",
        str(MAX_PAYLOAD_BYTES),
        "--max_inflight_requests",  # concurrency tests expect every request served
        "8",
    ]
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    try:
        with serve_in_subprocess(
            args, log_path, env={**os.environ, **s3_env}, timeout_s=STARTUP_TIMEOUT_S
        ) as running:
            yield Server(
                running.url,
                running.port,
                running.process,
                running.log_path,
                running.startup_s,
                grpc_address=f"127.0.0.1:{grpc_port}",
            )
    except ServerNotReady as err:
        pytest.fail(str(err))


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


def test_server_answers_a_dicom_instance_as_ingest_renders_it(server: Server) -> None:
    """A 12-bit DICOM MR instance in v1 ``image_bytes`` and in v2 BYTES gets the answer its
    pixels get as a PNG (one rendering, brainmri.dicom); the answer says nothing of the patient."""
    patient = DemoPatient.numbered("meningioma", 5)
    pixels = synthetic_slice("meningioma", np.random.default_rng(1), 64)
    dicom = dicom_instance(pixels, patient, bits_stored=12)
    png = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(png, "PNG")
    v1 = requests.post(
        f"{server.url}/v1/models/{MODEL_NAME}:predict",
        json=v1_body(dicom, png.getvalue()),
        timeout=30,
    )
    assert v1.status_code == 200, v1.text
    from_dicom, from_png = v1.json()["predictions"]
    assert from_dicom["probabilities"] == pytest.approx(from_png["probabilities"], abs=1e-6)
    tensor = {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [b64(dicom)]}
    v2 = requests.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer", json={"inputs": [tensor]}, timeout=30
    )
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o for o in v2.json()["outputs"]}
    assert outputs["probabilities"]["data"] == pytest.approx(
        list(from_png["probabilities"].values()), abs=1e-6
    )
    answers = v1.text + v2.text
    assert not [value for value in patient.values() if value in answers]
    unreadable = dicom_instance(pixels, patient, pixel_data=False)
    refused = requests.post(
        f"{server.url}/v1/models/{MODEL_NAME}:predict", json=v1_body(unreadable), timeout=30
    )
    assert refused.status_code == 400 and "DICOM without pixel data" in refused.text
    assert patient.patient_id not in refused.text


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


def test_server_health_metadata_and_metrics(server: Server) -> None:
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready"):
        response = requests.get(f"{server.url}{path}", timeout=5)
        assert response.status_code == 200, (path, response.text)
    meta = requests.get(f"{server.url}/v2/models/{MODEL_NAME}", timeout=5).json()
    assert [(i["name"], i["datatype"]) for i in meta["inputs"]] == [
        ("image_bytes", "BYTES"),
        ("pixels", "FP32"),
    ]
    assert server.predict(v1_body(encode())).status_code == 200
    assert server.predict({"instances": []}).status_code == 400
    metrics = requests.get(f"{server.url}/metrics", timeout=5)
    assert metrics.status_code == 200
    text = metrics.text
    for sample in (
        f'request_predict_seconds_count{{model_name="{MODEL_NAME}"}}',  # KServe's own
        f'request_preprocess_seconds_bucket{{le="0.005",model_name="{MODEL_NAME}"}}',
        f'brainmri_request_images_count{{model_name="{MODEL_NAME}"}}',
        f'brainmri_rejected_requests_total{{model_name="{MODEL_NAME}",reason="invalid_input"}}',
        f'brainmri_model_info{{backbone="tiny_cnn",image_size="64",model_name="{MODEL_NAME}",'
        'runtime="torch",version="v1"} 1.0',
    ):
        assert sample in text, sample


def test_server_v2_fp32_tensors_as_json_and_binary(server: Server) -> None:
    pixels = np.random.default_rng(0).normal(size=(2, 3, 64, 64)).astype(np.float32)
    url = f"{server.url}/v2/models/{MODEL_NAME}/infer"
    body = {"inputs": [{"name": "pixels", "shape": [2, 3, 64, 64], "datatype": "FP32"}]}
    body["inputs"][0]["data"] = pixels.reshape(-1).tolist()
    as_json = requests.post(url, json=body, timeout=30)
    assert as_json.status_code == 200, as_json.text
    probs = {o["name"]: o for o in as_json.json()["outputs"]}["probabilities"]
    assert probs["shape"] == [2, len(CLASS_NAMES)]

    tensor = InferInput("pixels", [2, 3, 64, 64], "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    payload, json_length = InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor]).to_rest()
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(json_length),
    }
    binary = requests.post(url, data=payload, headers=headers, timeout=30)
    assert binary.status_code == 200, binary.text
    again = {o["name"]: o for o in binary.json()["outputs"]}["probabilities"]
    assert again["data"] == pytest.approx(probs["data"], abs=1e-6)

    wrong = {"inputs": [{"name": "pixels", "shape": [1, 3, 8, 8], "datatype": "FP32"}]}
    wrong["inputs"][0]["data"] = [0.0] * 192
    response = requests.post(url, json=wrong, timeout=30)
    assert response.status_code == 400
    assert "shape [1, 3, 8, 8]" in response.json()["error"]
    assert "[N, 3, 64, 64]" in response.json()["error"]


def test_server_refuses_oversized_payloads_with_413_and_stays_up(server: Server) -> None:
    big = b64(os.urandom(MAX_PAYLOAD_BYTES))
    declared = server.predict({"instances": [{"image_bytes": {"b64": big}}]})
    assert declared.status_code == 413, declared.text
    assert f"limit of {MAX_PAYLOAD_BYTES} bytes (--max_payload_bytes)" in declared.json()["error"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced while reading
        yield b'{"instances": [{"image_bytes": {"b64": "'
        for _ in range(12):
            yield b"A" * 100_000
        yield b'"}}]}'

    streamed = server.predict(data=chunks(), headers={"content-type": "application/json"})
    assert streamed.status_code == 413, streamed.text
    assert "exceeds" in streamed.json()["error"]
    server.assert_alive()
    metrics = requests.get(f"{server.url}/metrics", timeout=5).text
    counted = re.search(
        rf'brainmri_rejected_requests_total{{model_name="{MODEL_NAME}",'
        r'reason="payload_too_large"} ([0-9.]+)',
        metrics,
    )
    assert counted and float(counted.group(1)) >= 2
    assert server.predict(v1_body(encode())).status_code == 200


def random_json(rng: random.Random, depth: int = 0) -> object:
    kinds = ["int", "float", "str", "bool", "null"] + (["list", "dict"] if depth < 3 else [])
    kind = rng.choice(kinds)
    if kind == "list":
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "dict":
        keys = ["instances", "inputs", "image_bytes", "b64", "data", "shape", "datatype", "name"]
        return {rng.choice(keys): random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return {
        "int": lambda: rng.randint(-(2**40), 2**40),
        "float": lambda: rng.uniform(-1e6, 1e6),
        "str": lambda: "".join(rng.choice("ab=+/%!é\x00") for _ in range(rng.randint(0, 12))),
        "bool": lambda: rng.random() < 0.5,
        "null": lambda: None,
    }[kind]()


def malformed_request(rng: random.Random, image: bytes) -> tuple[str, bytes, dict[str, str]]:
    """(path, body, headers) of one random malformed request, v1 or v2."""
    v1, v2 = f"/v1/models/{MODEL_NAME}:predict", f"/v2/models/{MODEL_NAME}/infer"
    as_json = {"content-type": "application/json"}

    def dumps(obj: object) -> bytes:
        return json.dumps(obj).encode()

    def v2_input() -> dict:
        datatype = rng.choice(["BYTES", "FP32", "FP64", "INT8", "UINT64", "BOGUS", 7])
        if rng.random() < 0.5:  # well-formed JSON, wrong content: shapes and data that agree
            shape = rng.choice([[2], [1, 3, 64, 64], [1, 3, 8, 8], [2, 3, 64, 64], [3, 64, 64]])
            count = 1 if not shape[0] else int(np.prod(shape))
            values = [random_json(rng) if rng.random() < 0.1 else rng.random()] * count
            return {"name": "x", "shape": shape, "datatype": datatype, "data": values}
        shape = [rng.randint(-2, 4) for _ in range(rng.randint(0, 5))]
        return {"name": "x", "shape": shape, "datatype": datatype, "data": random_json(rng)}

    choice = rng.randrange(10)
    if choice == 0:
        return rng.choice([v1, v2]), os.urandom(rng.randint(0, 3000)), as_json
    if choice == 1:
        return rng.choice([v1, v2]), dumps(random_json(rng)), as_json
    if choice == 2:
        body = {"instances": [random_json(rng) for _ in range(rng.randint(1, 5))]}
        return v1, dumps(body), as_json
    if choice == 3:
        garbage = b64(os.urandom(rng.randint(1, 500)))
        return v1, dumps({"instances": [{"image_bytes": {"b64": garbage}}]}), as_json
    if choice == 4:
        cut = b64(image[: rng.randint(1, len(image) - 1)])
        return (
            v1,
            dumps({"instances": [{"image_bytes": {"b64": cut}}] * rng.randint(1, 3)}),
            as_json,
        )
    if choice == 5:
        inputs = [v2_input() for _ in range(rng.choice([1, 1, 1, 0, 2]))]
        return v2, dumps({"inputs": inputs}), as_json
    if choice == 6:
        headers = {"inference-header-content-length": str(rng.randint(-5, 5000))}
        return v2, os.urandom(rng.randint(0, 2000)), headers
    if choice == 7:
        text = dumps(v1_body(image))
        return v1, text[: rng.randint(0, len(text) - 1)], as_json
    if choice == 8:
        content_type = rng.choice(["text/plain", "image/png", "application/x-www-form-urlencoded"])
        return rng.choice([v1, v2]), os.urandom(rng.randint(0, 500)), {"content-type": content_type}
    count = rng.choice([0, 65, 200])
    return v1, dumps({"instances": [{"image_bytes": {"b64": b64(image)}}] * count}), as_json


def test_server_survives_a_burst_of_random_malformed_bodies(server: Server) -> None:
    """Hundreds of random malformed requests, 8 at a time: every one a 4xx, none a 5xx."""
    rng = random.Random(6)
    image = encode("glioma", 11)
    requests_ = [malformed_request(rng, image) for _ in range(300)]

    def send(item: tuple[str, bytes, dict[str, str]]) -> tuple[int, str]:
        path, body, headers = item
        response = requests.post(f"{server.url}{path}", data=body, headers=headers, timeout=30)
        return response.status_code, response.text[:300]

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(send, requests_))
    not_4xx = [
        (path, body[:120], status, text)
        for (path, body, _), (status, text) in zip(requests_, outcomes, strict=True)
        if not 400 <= status < 500
    ]
    assert not not_4xx, not_4xx[:5]
    server.assert_alive()
    response = server.predict(v1_body(encode("pituitary", 12)))
    assert response.status_code == 200, response.text


def test_a_binary_v2_tensor_is_read_as_its_bytes_not_element_by_element() -> None:
    """KServe's decoder makes a Python list of every FP32 element (slower than the forward
    pass); ours keeps the bytes, and the request reads back the same."""
    from kserve import InferInput, InferRequest
    from kserve.model_repository import ModelRepository

    from serving.surface import ServingDataPlane

    pixels = np.random.default_rng(0).random((2, 3, 8, 8), dtype=np.float32)
    tensor = InferInput("pixels", list(pixels.shape), "FP32")
    tensor.set_data_from_numpy(pixels, binary_data=True)
    body, json_length = InferRequest(model_name="m", infer_inputs=[tensor]).to_rest()
    headers = {"inference-header-content-length": str(json_length)}
    plane = ServingDataPlane(model_registry=ModelRepository())
    request = plane.decode_inference_request(body, headers, "m")
    (decoded,) = request.inputs
    assert decoded.name == "pixels" and decoded.datatype == "FP32" and decoded.data is None
    assert np.array_equal(decoded.as_numpy(), pixels)

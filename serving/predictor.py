"""The KServe predictor: a trained model bundle behind the v1 and v2 inference protocols.

v1 (``POST /v1/models/<name>:predict``)::

    request:  {"instances": [{"image_bytes": {"b64": "<base64 PNG/JPEG/...>"}}, ...]}
    response: {"predictions": [{"label": "glioma",
                                "probabilities": {"glioma": 0.91, "meningioma": 0.04, ...},
                                "model_version": "v3"}, ...]}

v2 (``POST /v2/models/<name>/infer``, REST or gRPC), exactly one input, either

* ``BYTES`` of shape ``[N]``: encoded images (base64 strings over REST JSON, raw bytes over gRPC
  or the REST binary extension), named ``image_bytes`` in the metadata; or
* ``FP32`` of shape ``[N, 3, S, S]``: images already preprocessed as in training (``S`` is the
  bundle's ``preprocess.image_size``), named ``pixels`` in the metadata.

Outputs: ``label`` (BYTES ``[N]``) and ``probabilities`` (FP32 ``[N, C]``, class order in the
output's ``class_names`` parameter); the response's ``model_version`` is the bundle's version.

Every instance of one request goes through the network as one batch. Images are decoded and
preprocessed on a thread pool and forward passes run on their own small pool
(``forward_workers``), so the event loop stays free for health probes. Bad input raises
:class:`kserve.errors.InvalidInput`, which KServe answers with HTTP 400 (gRPC INVALID_ARGUMENT),
naming each offending instance.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model
from kserve.errors import InvalidInput, ModelNotReady
from kserve.logging import logger
from kserve.utils.utils import generate_uuid
from PIL import Image
from prometheus_client import Counter, Gauge, Histogram

from brainmri.images import ImageDecodeError, decode_image
from brainmri.model import ModelBundle, pick_device
from brainmri.storage import ObjectStore, S3Uri, is_s3_uri
from serving.limits import cpu_budget

IMAGE_KEY = "image_bytes"  # v1 instance key, and the advertised v2 BYTES input name
PIXELS_INPUT = "pixels"  # the advertised v2 FP32 input name (preprocessed tensors)
LABEL_OUTPUT = "label"
PROBABILITIES_OUTPUT = "probabilities"
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
UNKNOWN_VERSION = "unknown"
_MAX_LISTED_ERRORS = 5
_V1_INSTANCE = '{"image_bytes": {"b64": "<base64>"}}'
_V1_EXAMPLE = f'{{"instances": [{_V1_INSTANCE}]}}'

# Prometheus metrics, next to KServe's request_{preprocess,predict,postprocess}_seconds on /metrics
IMAGES_PER_REQUEST = Histogram(
    "brainmri_request_images",
    "Images per accepted inference request (one forward pass each).",
    ["model_name"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
REJECTED_REQUESTS = Counter(
    "brainmri_rejected_requests",
    "Inference requests refused with a 4xx, by reason.",
    ["model_name", "reason"],
)
MODEL_INFO = Gauge(
    "brainmri_model_info",
    "The served model bundle (value 1): version, backbone and input size as labels.",
    ["model_name", "version", "backbone", "image_size"],
)


@dataclass(frozen=True)
class Batch:
    """A validated request: the preprocessed batch, and the v2 request it came from (or None)."""

    pixels: torch.Tensor  # float32 [N, 3, S, S], normalised as in training
    v2_request: InferRequest | None = None

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


class BrainMRIModel(Model):
    """Serves a :class:`~brainmri.model.ModelBundle` loaded from ``s3://`` or a local directory.

    ``max_batch_size`` caps the images of one request, ``max_payload_bytes`` the declared size of
    its body (the HTTP middleware in :mod:`serving.limits` enforces it before the body is read;
    this is the same check for requests that reach the model another way), ``max_image_pixels``
    the pixels of one image before it is decoded. ``decode_workers`` threads decode and
    preprocess images (default: the process's CPU budget); ``forward_workers`` forward passes
    may run at once (default 1; ``python -m serving`` picks it for the device).
    """

    def __init__(
        self,
        name: str,
        storage_uri: str,
        *,
        device: torch.device | str | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        decode_workers: int | None = None,
        forward_workers: int = 1,
    ) -> None:
        super().__init__(name)
        for what, value in (
            ("max_batch_size", max_batch_size),
            ("max_payload_bytes", max_payload_bytes),
            ("max_image_pixels", max_image_pixels),
            ("decode_workers", 1 if decode_workers is None else decode_workers),
            ("forward_workers", forward_workers),
        ):
            if value < 1:
                raise ValueError(f"{what} must be at least 1, got {value}")
        self.storage_uri = storage_uri
        self.max_batch_size = max_batch_size
        self.max_payload_bytes = max_payload_bytes
        self.max_image_pixels = max_image_pixels
        self.decode_workers = decode_workers or cpu_budget()
        self.forward_workers = forward_workers
        self._device = device
        self.bundle: ModelBundle | None = None
        self.model_version = UNKNOWN_VERSION
        # Created on first use (so the model also works after being pickled into a worker
        # process): decoding in parallel, and a bounded number of forward passes at a time,
        # which keeps torch's threads from oversubscribing the CPU under concurrent requests.
        self._decode_pool: ThreadPoolExecutor | None = None
        self._forward_pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_decode_pool"] = state["_forward_pool"] = None  # thread pools do not pickle
        return state

    # -- loading -------------------------------------------------------------------------
    def load(self) -> bool:
        """Fetch the bundle, rebuild the network, run one warm-up pass, then report ready."""
        started = time.perf_counter()
        device = torch.device(self._device) if self._device is not None else pick_device()
        if is_s3_uri(self.storage_uri):
            uri = S3Uri.parse(self.storage_uri)
            with tempfile.TemporaryDirectory(prefix="brainmri-model-") as tmp:
                count = ObjectStore().download_dir(uri, Path(tmp), progress=False)
                logger.info("Downloaded %d file(s) from %s", count, uri)
                bundle = ModelBundle.load(Path(tmp), device)
        else:
            bundle = ModelBundle.load(self._local_dir(), device)
        self._warm_up(bundle)
        self.bundle = bundle
        self.model_version = str(bundle.metadata.get("version") or UNKNOWN_VERSION)
        MODEL_INFO.labels(
            self.name, self.model_version, bundle.backbone, str(bundle.preprocess.image_size)
        ).set(1)
        self.ready = True
        logger.info(
            "Model %r ready in %.2fs: %s %s, version %s, classes %s, input %dpx, device %s",
            self.name,
            time.perf_counter() - started,
            bundle.backbone,
            self.storage_uri,
            self.model_version,
            bundle.class_names,
            bundle.preprocess.image_size,
            device,
        )
        return self.ready

    def _local_dir(self) -> Path:
        location = self.storage_uri.removeprefix("file://")
        if "://" in location:
            raise ValueError(
                f"unsupported storage URI {self.storage_uri!r}: use s3://bucket/prefix or a "
                "local directory holding model.json and model.pt"
            )
        path = Path(location)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory {path} does not exist")
        return path

    @staticmethod
    def _warm_up(bundle: ModelBundle) -> None:
        """One pass through decode-free preprocessing and the network, so the first request is
        not slow; it also checks the network's output against the bundle's classes."""
        size = bundle.preprocess.image_size
        pixels = bundle.preprocess(Image.new("RGB", (size, size))).unsqueeze(0)
        probs = bundle.predict_proba(pixels)
        if probs.shape != (1, len(bundle.class_names)):
            raise RuntimeError(
                f"model output shape {tuple(probs.shape)} does not match "
                f"{len(bundle.class_names)} classes {bundle.class_names}"
            )

    def stop(self) -> None:
        super().stop()
        for pool in (self._decode_pool, self._forward_pool):
            if pool is not None:
                pool.shutdown(wait=False)  # queued work still finishes
        self._decode_pool = self._forward_pool = None

    def _pools(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        if self.bundle is None or not self.ready:
            raise ModelNotReady(self.name, "Its bundle is not loaded (load() not run, or stopped).")
        if self._decode_pool is None:
            self._decode_pool = ThreadPoolExecutor(
                max_workers=self.decode_workers, thread_name_prefix="brainmri-decode"
            )
        if self._forward_pool is None:
            self._forward_pool = ThreadPoolExecutor(
                max_workers=self.forward_workers, thread_name_prefix="brainmri-forward"
            )
        return self._decode_pool, self._forward_pool

    @property
    def image_size(self) -> int:
        return self.bundle.preprocess.image_size if self.bundle else -1

    # -- v2 metadata -----------------------------------------------------------------------
    def get_input_types(self) -> list[dict]:
        """Two alternative inputs; a request sends exactly one of them."""
        size = self.image_size
        return [
            {"name": IMAGE_KEY, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS_INPUT, "datatype": "FP32", "shape": [-1, 3, size, size]},
        ]

    def get_output_types(self) -> list[dict]:
        classes = len(self.bundle.class_names) if self.bundle else -1
        return [
            {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, classes]},
        ]

    # -- inference -------------------------------------------------------------------------
    async def preprocess(
        self, payload: dict | InferRequest | Any, headers: dict[str, str] | None = None
    ) -> Batch:
        """Validate the request and turn it into one preprocessed batch (off the event loop)."""
        try:
            self._check_declared_size(headers)
            if isinstance(payload, InferRequest):
                batch = await self._v2_batch(payload)
            else:
                encoded = self._v1_encoded(payload)
                batch = Batch(await self._pixels_of(encoded, _v1_location))
        except InvalidInput:
            REJECTED_REQUESTS.labels(self.name, "invalid_input").inc()
            raise
        IMAGES_PER_REQUEST.labels(self.name).observe(len(batch))
        return batch

    def validate(self, payload: Any) -> Any:
        # kserve's protocol checks index into dicts; ours is already validated
        return payload if isinstance(payload, Batch) else super().validate(payload)

    async def predict(
        self,
        payload: Batch,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict | InferResponse:
        """One batched forward pass for all instances, then the protocol's response."""
        _, forward_pool = self._pools()
        loop = asyncio.get_running_loop()
        probs = await loop.run_in_executor(forward_pool, self.bundle.predict_proba, payload.pixels)
        if payload.v2_request is not None:
            return self._v2_response(payload.v2_request, probs)
        return self._v1_response(probs)

    def _check_declared_size(self, headers: dict[str, str] | None) -> None:
        declared = (headers or {}).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_payload_bytes:
            raise InvalidInput(
                f"the request body is {declared} bytes, more than the server's limit of "
                f"{self.max_payload_bytes} bytes (--max_payload_bytes); "
                "send fewer or smaller images per request"
            )

    async def _pixels_of(
        self, encoded: Sequence[str | bytes | _Problem], where: Callable[[int], str]
    ) -> torch.Tensor:
        """Decode and preprocess every image in parallel; InvalidInput lists each one that fails,
        by position."""
        decode_pool, _ = self._pools()
        loop = asyncio.get_running_loop()
        prepare = self._prepare_one
        outcomes = await asyncio.gather(
            *(loop.run_in_executor(decode_pool, prepare, item) for item in encoded),
            return_exceptions=True,
        )
        tensors, errors = [], []
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, ValueError):
                errors.append(f"{where(index)}: {outcome}")
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                tensors.append(outcome)
        if errors:
            raise InvalidInput(_summarise(errors))
        return torch.stack(tensors)

    def _prepare_one(self, item: str | bytes | _Problem) -> torch.Tensor:
        """One encoded image -> the network's input, exactly as in training (ValueError if bad)."""
        return self.bundle.preprocess(_decode_one(item, self.max_image_pixels))

    # -- v1 --------------------------------------------------------------------------------
    def _v1_encoded(self, body: Any) -> list[str | _Problem]:
        """The base64 strings of a v1 body (a :class:`_Problem` for each malformed instance)."""
        if isinstance(body, bytes | bytearray | str):
            raise InvalidInput(
                f"request body must be JSON sent with Content-Type: application/json, "
                f"for example {_V1_EXAMPLE}"
            )
        if not isinstance(body, dict):
            raise InvalidInput(
                f"request body must be a JSON object, got {_json_type(body)}; "
                f"expected {_V1_EXAMPLE}"
            )
        if "instances" not in body:
            raise InvalidInput(f"request has no 'instances' field; expected {_V1_EXAMPLE}")
        instances = body["instances"]
        if not isinstance(instances, list):
            raise InvalidInput(f"'instances' must be a list, got {_json_type(instances)}")
        self._check_batch_size(len(instances), "'instances'")
        return [_v1_instance(instance) for instance in instances]

    def _v1_response(self, probs: torch.Tensor) -> dict:
        classes = self.bundle.class_names
        predictions = [
            {
                "label": classes[int(np.argmax(row))],
                "probabilities": dict(zip(classes, row, strict=True)),
                "model_version": self.model_version,
            }
            for row in probs.tolist()
        ]
        return {"predictions": predictions}

    # -- v2 --------------------------------------------------------------------------------
    async def _v2_batch(self, request: InferRequest) -> Batch:
        if len(request.inputs) != 1:
            names = [inp.name for inp in request.inputs]
            raise InvalidInput(
                f"expected exactly one input (BYTES '{IMAGE_KEY}': encoded images, or FP32 "
                f"'{PIXELS_INPUT}': preprocessed tensors), got {len(names)}: {names}"
            )
        tensor = request.inputs[0]
        if tensor.datatype == "BYTES":
            items = self._v2_encoded(tensor)
            return Batch(await self._pixels_of(items, _v2_location(tensor.name)), request)
        if tensor.datatype == "FP32":
            return Batch(self._v2_pixels(tensor), request)
        raise InvalidInput(
            f"input '{tensor.name}' has datatype {tensor.datatype}; expected BYTES (encoded "
            f"images, base64 strings over REST) or FP32 (preprocessed tensors of shape "
            f"{self._pixels_shape()})"
        )

    def _v2_encoded(self, tensor: Any) -> list[str | bytes]:
        """The encoded images of a BYTES input: base64 ``str`` (REST) or raw ``bytes``."""
        try:
            items = tensor.as_numpy().reshape(-1).tolist()
        except (ValueError, TypeError, InvalidInput) as err:
            raise InvalidInput(
                f"input '{tensor.name}': data does not fit shape {tensor.shape} ({err})"
            ) from err
        self._check_batch_size(len(items), f"input '{tensor.name}'")
        bad = [
            f"{tensor.name}[{i}] must be a string or bytes, got {_json_type(item)}"
            for i, item in enumerate(items)
            if not isinstance(item, str | bytes)
        ]
        if bad:
            raise InvalidInput(_summarise(bad))
        return items

    def _v2_pixels(self, tensor: Any) -> torch.Tensor:
        """A preprocessed FP32 input as the network's batch, after checking its shape."""
        size = self.image_size
        shape = [int(d) for d in tensor.shape] if isinstance(tensor.shape, list | tuple) else []
        if len(shape) != 4 or shape[1:] != [3, size, size]:
            raise InvalidInput(
                f"input '{tensor.name}' has shape {tensor.shape}; expected "
                f"{self._pixels_shape()}: N images, 3 channels, {size}x{size} pixels, "
                "preprocessed as in training"
            )
        self._check_batch_size(shape[0], f"input '{tensor.name}'")
        try:
            array = np.asarray(tensor.as_numpy(), dtype=np.float32).reshape(shape)
        except (ValueError, TypeError, InvalidInput) as err:
            raise InvalidInput(
                f"input '{tensor.name}': data does not fit shape {tensor.shape} ({err})"
            ) from err
        if not np.isfinite(array).all():
            raise InvalidInput(f"input '{tensor.name}' holds NaN or infinite values")
        return torch.from_numpy(np.ascontiguousarray(array))

    def _pixels_shape(self) -> str:
        return f"[N, 3, {self.image_size}, {self.image_size}]"

    def _v2_response(self, request: InferRequest, probs: torch.Tensor) -> InferResponse:
        classes = self.bundle.class_names
        labels = [classes[int(i)] for i in probs.argmax(dim=1)]
        outputs = [
            InferOutput(LABEL_OUTPUT, shape=[len(labels)], datatype="BYTES", data=labels),
            InferOutput(
                PROBABILITIES_OUTPUT,
                shape=list(probs.shape),
                datatype="FP32",
                data=probs.numpy().astype(np.float32).reshape(-1).tolist(),
                parameters={"class_names": ",".join(classes)},
            ),
        ]
        return InferResponse(
            response_id=request.id or generate_uuid(),
            model_name=self.name,
            model_version=self.model_version,
            infer_outputs=outputs,
            use_binary_outputs=request.use_binary_outputs,
            requested_outputs=request.request_outputs,
        )

    def _check_batch_size(self, count: int, what: str) -> None:
        if count == 0:
            raise InvalidInput(f"{what} is empty: send at least one image")
        if count > self.max_batch_size:
            raise InvalidInput(
                f"{what} holds {count} images, more than the limit of "
                f"{self.max_batch_size} per request (--max_batch_size); "
                "split it into smaller requests"
            )


# -- helpers -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Problem:
    """A malformed instance, carried to decoding so every bad instance is reported together."""

    message: str


def _v1_instance(instance: Any) -> str | _Problem:
    if not isinstance(instance, dict):
        return _Problem(f"must be an object like {_V1_INSTANCE}, got {_json_type(instance)}")
    image = instance.get(IMAGE_KEY)
    if not isinstance(image, dict):
        what = "no" if image is None else f"a non-object ({_json_type(image)})"
        return _Problem(f"has {what} '{IMAGE_KEY}' field; expected {_V1_INSTANCE}")
    b64 = image.get("b64")
    if not isinstance(b64, str):
        what = "no" if b64 is None else f"a non-string ({_json_type(b64)})"
        return _Problem(f"has {what} '{IMAGE_KEY}.b64' field; expected {_V1_INSTANCE}")
    return b64


def _v1_location(index: int) -> str:
    return f"instances[{index}]"


def _v2_location(name: str) -> Callable[[int], str]:
    return lambda index: f"{name}[{index}]"


def _decode_one(item: str | bytes | _Problem, max_pixels: int) -> Image.Image:
    """An encoded image (base64 text or raw bytes) as a decoded RGB image, or ValueError."""
    if isinstance(item, _Problem):
        raise ValueError(item.message)
    if isinstance(item, str):
        compact = "".join(item.split())  # tolerate line-wrapped base64 (e.g. `base64` CLI)
        if not compact:
            raise ValueError("empty string, expected a base64-encoded image")
        try:
            data = base64.b64decode(compact, validate=True)
        except binascii.Error as err:
            raise ValueError(f"not valid base64 ({err})") from err
    else:
        data = bytes(item)
    _check_dimensions(data, max_pixels)
    try:
        return decode_image(data)
    except ImageDecodeError as err:
        raise ValueError(str(err).removeprefix("payload: ")) from err
    except Image.DecompressionBombError as err:  # not a ValueError, so decode_image lets it by
        raise ValueError(f"image too large to decode safely ({err})") from err
    except Exception as err:  # PIL's decoders raise more kinds on crafted files (struct.error...)
        raise ValueError(f"not a readable image ({type(err).__name__}: {err})") from err


def _check_dimensions(data: bytes, max_pixels: int) -> None:
    """Refuse an image whose header announces more than ``max_pixels`` before decoding it."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
    except Image.DecompressionBombError as err:
        raise ValueError(f"image too large to decode safely ({err})") from err
    except Exception:  # not an image: decode_image says precisely why
        return
    if width * height > max_pixels:
        raise ValueError(
            f"image of {width}x{height} pixels is too large: the limit is {max_pixels} pixels "
            "(--max_image_pixels)"
        )


def _summarise(errors: list[str]) -> str:
    shown = "; ".join(errors[:_MAX_LISTED_ERRORS])
    more = len(errors) - _MAX_LISTED_ERRORS
    return f"{shown}; and {more} more" if more > 0 else shown


def _json_type(value: Any) -> str:
    names = {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
        bytes: "bytes",
    }
    return names.get(type(value), type(value).__name__)

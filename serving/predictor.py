"""The KServe predictor: a trained model bundle behind the v1 and v2 inference protocols.

v1 (``POST /v1/models/<name>:predict``)::

    request:  {"instances": [{"image_bytes": {"b64": "<base64 PNG/JPEG/...>"}}, ...]}
    response: {"predictions": [{"label": "glioma",
                                "probabilities": {"glioma": 0.91, "meningioma": 0.04, ...},
                                "model_version": "v3"}, ...]}

v2 (``POST /v2/models/<name>/infer``, REST or gRPC): one ``BYTES`` input of shape ``[N]`` whose
elements are encoded images (base64 strings over REST JSON, raw bytes over gRPC); outputs
``label`` (BYTES ``[N]``) and ``probabilities`` (FP32 ``[N, C]``, class order in the output's
``class_names`` parameter).

Every instance of one request goes through the network as one batch. Bad input raises
:class:`kserve.errors.InvalidInput`, which KServe answers with HTTP 400 (gRPC INVALID_ARGUMENT),
naming each offending instance.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
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

from brainmri.images import ImageDecodeError, decode_image
from brainmri.model import ModelBundle, pick_device
from brainmri.storage import ObjectStore, S3Uri, is_s3_uri

IMAGE_KEY = "image_bytes"  # v1 instance key, and the advertised v2 input name
LABEL_OUTPUT = "label"
PROBABILITIES_OUTPUT = "probabilities"
DEFAULT_MAX_BATCH_SIZE = 64
UNKNOWN_VERSION = "unknown"
_MAX_LISTED_ERRORS = 5
_V1_INSTANCE = '{"image_bytes": {"b64": "<base64>"}}'
_V1_EXAMPLE = f'{{"instances": [{_V1_INSTANCE}]}}'


@dataclass(frozen=True)
class DecodedBatch:
    """A validated request: decoded images, and the v2 request they came from (None for v1)."""

    images: list[Image.Image]
    v2_request: InferRequest | None = None


class BrainMRIModel(Model):
    """Serves a :class:`~brainmri.model.ModelBundle` loaded from ``s3://`` or a local directory."""

    def __init__(
        self,
        name: str,
        storage_uri: str,
        *,
        device: torch.device | str | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ) -> None:
        super().__init__(name)
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.storage_uri = storage_uri
        self.max_batch_size = max_batch_size
        self._device = device
        self.bundle: ModelBundle | None = None
        self.model_version = UNKNOWN_VERSION
        # one forward pass at a time: keeps torch's intra-op threads from oversubscribing the
        # CPU under concurrent requests, and keeps the event loop free for health probes
        self._executor: ThreadPoolExecutor | None = None

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
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="brainmri-infer")
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
        """One forward pass through the whole serving path, so the first request is not slow."""
        size = bundle.preprocess.image_size
        probs = bundle.predict_images([Image.new("RGB", (size, size))])
        if probs.shape != (1, len(bundle.class_names)):
            raise RuntimeError(
                f"model output shape {tuple(probs.shape)} does not match "
                f"{len(bundle.class_names)} classes {bundle.class_names}"
            )

    def stop(self) -> None:
        super().stop()
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # queued passes still finish
            self._executor = None

    # -- v2 metadata -----------------------------------------------------------------------
    def get_input_types(self) -> list[dict]:
        return [{"name": IMAGE_KEY, "datatype": "BYTES", "shape": [-1]}]

    def get_output_types(self) -> list[dict]:
        classes = len(self.bundle.class_names) if self.bundle else -1
        return [
            {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, classes]},
        ]

    # -- inference -------------------------------------------------------------------------
    async def preprocess(
        self, payload: dict | InferRequest | Any, headers: dict[str, str] | None = None
    ) -> DecodedBatch:
        """Validate the request and decode every image (off the event loop)."""
        if isinstance(payload, InferRequest):
            encoded, where = self._v2_encoded(payload), _v2_location(payload)
        else:
            encoded, where = self._v1_encoded(payload), _v1_location
        images = await asyncio.to_thread(_decode_images, encoded, where)
        return DecodedBatch(images, payload if isinstance(payload, InferRequest) else None)

    def validate(self, payload: Any) -> Any:
        # kserve's protocol checks index into dicts; ours is already validated
        return payload if isinstance(payload, DecodedBatch) else super().validate(payload)

    async def predict(
        self,
        payload: DecodedBatch,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict | InferResponse:
        """One batched forward pass for all instances, then the protocol's response."""
        if self.bundle is None or self._executor is None:
            raise ModelNotReady(self.name, "Its bundle is not loaded (load() not run, or stopped).")
        loop = asyncio.get_running_loop()
        probs = await loop.run_in_executor(
            self._executor, self.bundle.predict_images, payload.images
        )
        if payload.v2_request is not None:
            return self._v2_response(payload.v2_request, probs)
        return self._v1_response(probs)

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
                "label": classes[int(row.argmax())],
                "probabilities": dict(zip(classes, row.tolist(), strict=True)),
                "model_version": self.model_version,
            }
            for row in probs
        ]
        return {"predictions": predictions}

    # -- v2 --------------------------------------------------------------------------------
    def _v2_encoded(self, request: InferRequest) -> list[str | bytes]:
        """The encoded images of a v2 request: base64 ``str`` (REST) or raw ``bytes`` (gRPC)."""
        if len(request.inputs) != 1:
            names = [inp.name for inp in request.inputs]
            raise InvalidInput(
                f"expected exactly one input (a BYTES tensor of encoded images, "
                f"e.g. named '{IMAGE_KEY}'), got {len(names)}: {names}"
            )
        tensor = request.inputs[0]
        if tensor.datatype != "BYTES":
            raise InvalidInput(
                f"input '{tensor.name}' has datatype {tensor.datatype}; expected "
                "BYTES holding encoded images (base64 strings over REST)"
            )
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
                f"{self.max_batch_size} per request; split it into smaller requests"
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


def _v2_location(request: InferRequest) -> Callable[[int], str]:
    name = request.inputs[0].name
    return lambda index: f"{name}[{index}]"


def _decode_images(
    encoded: Sequence[str | bytes | _Problem], where: Callable[[int], str]
) -> list[Image.Image]:
    """Decode every image; InvalidInput lists each one that fails, by position."""
    images, errors = [], []
    for index, item in enumerate(encoded):
        try:
            images.append(_decode_one(item))
        except ValueError as err:
            errors.append(f"{where(index)}: {err}")
    if errors:
        raise InvalidInput(_summarise(errors))
    return images


def _decode_one(item: str | bytes | _Problem) -> Image.Image:
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
    try:
        return decode_image(data)
    except ImageDecodeError as err:
        raise ValueError(str(err).removeprefix("payload: ")) from err
    except Image.DecompressionBombError as err:  # not a ValueError, so decode_image lets it by
        raise ValueError(f"image too large to decode safely ({err})") from err


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

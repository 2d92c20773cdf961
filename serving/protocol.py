"""The inference protocols the predictor speaks: reading requests, refusing bad ones, writing
answers.

v1 (``POST /v1/models/<name>:predict``)::

    request:  {"instances": [{"image_bytes": {"b64": "<base64 PNG/JPEG/...>"}}, ...]}
    response: {"predictions": [{"label": "glioma",
                                "confidence": 0.91,
                                "probabilities": {"glioma": 0.91, "meningioma": 0.04, ...},
                                "prediction_set": ["glioma"],
                                "uncertain": false,
                                "ood_score": -7.2,
                                "model_version": "v3"}, ...]}

``probabilities`` are calibrated (the bundle's temperature), ``confidence`` is the highest;
``prediction_set`` holds the true class for the bundle's stated coverage (95 % by default);
``uncertain`` is true when that set does not hold exactly one class or the confidence is below
the threshold fitted on validation; ``ood_score`` is the out-of-distribution score (higher: less
like a brain MRI; ``null`` for a bundle without a detector). An image the detector rejects is
answered ``{"label": "not_brain_mri", "probabilities": {}, "prediction_set": [],
"uncertain": true, ...}``: no tumour label at all.

``POST /v1/models/<name>:explain`` takes the same request and answers
``{"explanations": [...]}``: each prediction as above plus ``explained_label`` (the tumour class
the map is for: the top class, also for a rejected image), ``heatmap`` (``{"b64": "<PNG>"}``,
8-bit grey, the size of the sent image, 255 where the evidence for that class is strongest) and
``box`` (``[x0, y0, x1, y1]``, end-exclusive pixels of the sent image: the hottest region).

v2 (``POST /v2/models/<name>/infer``, REST or gRPC), exactly one input, either

* ``BYTES`` of shape ``[N]``: encoded images (base64 strings over REST JSON, raw bytes over gRPC
  or the REST binary extension), named ``image_bytes`` in the metadata; or
* ``FP32`` of shape ``[N, 3, S, S]``: images already preprocessed as in training (``S`` is the
  bundle's ``preprocess.image_size``), named ``pixels`` in the metadata.

Outputs: ``label`` (BYTES ``[N]``, ``not_brain_mri`` for a rejected image), ``probabilities``
(FP32 ``[N, C]``, calibrated, class order in the output's ``class_names`` parameter; zeros for a
rejected image), ``prediction_set`` (BYTES ``[N]``, the set's classes joined by commas),
``uncertain`` (BOOL ``[N]``) and, with a detector, ``ood_score`` (FP32 ``[N]``); the response's
``model_version`` is the bundle's version.

Over REST the binary extension (``inference-header-content-length``) is read here, not by
KServe (:func:`read_binary_extension`): every size, shape and element is checked, and BYTES
elements become base64 strings in the JSON, so the reference client's binary images and its
JSON ones reach the model alike.

Every refusal is a :class:`BadRequest` (a :class:`kserve.errors.InvalidInput`): HTTP 400 (gRPC
INVALID_ARGUMENT), naming each offending instance and what was expected.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput
from kserve.utils.utils import generate_uuid
from PIL import Image

from brainmri.dicom import dicom_size, is_dicom
from brainmri.images import ImageDecodeError, decode_image
from brainmri.trust import NOT_BRAIN_MRI, Assessment, hottest_box

IMAGE_KEY = "image_bytes"  # v1 instance key, and the advertised v2 BYTES input name
PIXELS_INPUT = "pixels"  # the advertised v2 FP32 input name (preprocessed tensors)
LABEL_OUTPUT = "label"
PROBABILITIES_OUTPUT = "probabilities"
SET_OUTPUT = "prediction_set"
UNCERTAIN_OUTPUT = "uncertain"
OOD_OUTPUT = "ood_score"
MAX_LISTED_ERRORS = 5
BINARY_HEADER = "inference-header-content-length"  # the v2 REST binary extension's header
# bytes per element of each v2 datatype sent in the binary extension (BYTES is length-prefixed)
ELEMENT_BYTES = {
    "BOOL": 1,
    "INT8": 1,
    "UINT8": 1,
    "INT16": 2,
    "UINT16": 2,
    "FP16": 2,
    "INT32": 4,
    "UINT32": 4,
    "FP32": 4,
    "INT64": 8,
    "UINT64": 8,
    "FP64": 8,
}
V1_INSTANCE = '{"image_bytes": {"b64": "<base64>"}}'
V1_EXAMPLE = f'{{"instances": [{V1_INSTANCE}]}}'


class BadRequest(InvalidInput):
    """A refused request: HTTP 400 (gRPC INVALID_ARGUMENT) with the reason, logged as one line
    (KServe's own handler logs every refusal as an error with its traceback)."""


@dataclass(frozen=True)
class Limits:
    """What one request may hold (each a server flag)."""

    max_batch_size: int
    max_payload_bytes: int
    max_image_pixels: int


@dataclass(frozen=True)
class Problem:
    """A malformed instance, carried to decoding so every bad instance is reported together."""

    message: str


Encoded = str | bytes | Problem  # base64 text, raw bytes, or why the instance is unusable


def check_declared_size(headers: dict[str, str] | None, limits: Limits) -> None:
    """Refuse a request whose declared body is over the limit (the HTTP middleware does this
    before the body is read; this covers requests that reach the model another way)."""
    declared = (headers or {}).get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_payload_bytes:
        raise BadRequest(
            f"the request body is {declared} bytes, more than the server's limit of "
            f"{limits.max_payload_bytes} bytes (--max_payload_bytes); "
            "send fewer or smaller images per request"
        )


def check_batch_size(count: int, what: str, limits: Limits) -> None:
    if count == 0:
        raise BadRequest(f"{what} is empty: send at least one image")
    if count > limits.max_batch_size:
        raise BadRequest(
            f"{what} holds {count} images, more than the limit of "
            f"{limits.max_batch_size} per request (--max_batch_size); "
            "split it into smaller requests"
        )


def summarise(errors: list[str]) -> str:
    shown = "; ".join(errors[:MAX_LISTED_ERRORS])
    more = len(errors) - MAX_LISTED_ERRORS
    return f"{shown}; and {more} more" if more > 0 else shown


def json_type(value: Any) -> str:
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


# -- v1 ------------------------------------------------------------------------------------------


def v1_encoded_images(body: Any, limits: Limits) -> list[Encoded]:
    """The base64 strings of a v1 body (a :class:`Problem` for each malformed instance)."""
    if isinstance(body, bytes | bytearray | str):
        raise BadRequest(
            "request body must be JSON sent with Content-Type: application/json, "
            f"for example {V1_EXAMPLE}"
        )
    if not isinstance(body, dict):
        raise BadRequest(
            f"request body must be a JSON object, got {json_type(body)}; expected {V1_EXAMPLE}"
        )
    if "instances" not in body:
        raise BadRequest(f"request has no 'instances' field; expected {V1_EXAMPLE}")
    instances = body["instances"]
    if not isinstance(instances, list):
        raise BadRequest(f"'instances' must be a list, got {json_type(instances)}")
    check_batch_size(len(instances), "'instances'", limits)
    return [_v1_instance(instance) for instance in instances]


def _v1_instance(instance: Any) -> str | Problem:
    if not isinstance(instance, dict):
        return Problem(f"must be an object like {V1_INSTANCE}, got {json_type(instance)}")
    image = instance.get(IMAGE_KEY)
    if not isinstance(image, dict):
        what = "no" if image is None else f"a non-object ({json_type(image)})"
        return Problem(f"has {what} '{IMAGE_KEY}' field; expected {V1_INSTANCE}")
    b64 = image.get("b64")
    if not isinstance(b64, str):
        what = "no" if b64 is None else f"a non-string ({json_type(b64)})"
        return Problem(f"has {what} '{IMAGE_KEY}.b64' field; expected {V1_INSTANCE}")
    return b64


def v1_location(index: int) -> str:
    return f"instances[{index}]"


def answers(assessment: Assessment, class_names: list[str]) -> list[dict[str, Any]]:
    """Each image's answer as plain data (the v1 prediction, less the version)."""
    rows = zip(
        assessment.probabilities.tolist(),
        assessment.set_members(class_names),
        assessment.uncertain.tolist(),
        assessment.ood_scores.tolist(),
        assessment.not_brain_mri.tolist(),
        strict=True,
    )
    result = []
    for proba, members, uncertain, score, rejected in rows:
        answer: dict[str, Any] = {
            "label": NOT_BRAIN_MRI if rejected else class_names[int(np.argmax(proba))],
            "confidence": None if rejected else max(proba),
            "probabilities": {} if rejected else dict(zip(class_names, proba, strict=True)),
            "prediction_set": [] if rejected else members,
            "uncertain": bool(uncertain),
            "ood_score": None if math.isnan(score) else score,
        }
        result.append(answer)
    return result


def v1_response(assessment: Assessment, class_names: list[str], version: str) -> dict:
    predictions = [
        {**answer, "model_version": version} for answer in answers(assessment, class_names)
    ]
    return {"predictions": predictions}


def explain_response(
    assessment: Assessment,
    class_names: list[str],
    version: str,
    heatmaps: list[torch.Tensor],
    explained: torch.Tensor,
) -> dict:
    """The ``:explain`` answer: each prediction with its heatmap PNG and hottest box."""
    explanations = []
    for answer, heatmap, label in zip(
        answers(assessment, class_names), heatmaps, explained.tolist(), strict=True
    ):
        picture = Image.fromarray((heatmap.numpy() * 255).round().astype(np.uint8), mode="L")
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        explanations.append(
            {
                **answer,
                "model_version": version,
                "explained_label": class_names[label],
                "heatmap": {"b64": base64.b64encode(buffer.getvalue()).decode("ascii")},
                "box": list(hottest_box(heatmap)),
            }
        )
    return {"explanations": explanations}


# -- v2 ------------------------------------------------------------------------------------------


def pixels_shape(image_size: int) -> str:
    return f"[N, 3, {image_size}, {image_size}]"


def v2_input(request: InferRequest, image_size: int) -> Any:
    """The request's one input, BYTES or FP32 (anything else is refused, saying what to send)."""
    if len(request.inputs) != 1:
        names = [inp.name for inp in request.inputs]
        raise BadRequest(
            f"expected exactly one input (BYTES '{IMAGE_KEY}': encoded images, or FP32 "
            f"'{PIXELS_INPUT}': preprocessed tensors), got {len(names)}: {names}"
        )
    tensor = request.inputs[0]
    if tensor.datatype not in ("BYTES", "FP32"):
        raise BadRequest(
            f"input '{tensor.name}' has datatype {tensor.datatype}; expected BYTES (encoded "
            f"images, base64 strings over REST) or FP32 (preprocessed tensors of shape "
            f"{pixels_shape(image_size)})"
        )
    return tensor


def declared_shape(tensor: Any) -> list[int]:
    """A v2 input's shape as non-negative integers (``-1`` or any other wildcard is refused:
    the data's real size must be declared, or it could bypass --max_batch_size)."""
    shape = tensor.shape if isinstance(tensor.shape, list | tuple) else None
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest(
            f"input '{tensor.name}' has shape {tensor.shape}; expected a list of "
            "non-negative integers"
        )
    if any(d < 0 for d in shape):
        raise BadRequest(
            f"input '{tensor.name}' has shape {list(shape)}: a negative dimension is not "
            "allowed in a request; send the real number of images"
        )
    return [int(d) for d in shape]


def v2_location(name: str) -> Callable[[int], str]:
    return lambda index: f"{name}[{index}]"


def v2_encoded_images(tensor: Any, limits: Limits) -> list[str | bytes]:
    """The encoded images of a BYTES input of shape ``[N]`` (or ``[N, 1]``): base64 ``str``
    (REST) or raw ``bytes`` (gRPC)."""
    shape = declared_shape(tensor)
    if len(shape) > 2 or (len(shape) == 2 and shape[1] != 1):
        raise BadRequest(
            f"input '{tensor.name}' has shape {shape}; expected [N]: one encoded image each"
        )
    check_batch_size(shape[0], f"input '{tensor.name}'", limits)
    try:
        items = tensor.as_numpy().reshape(-1).tolist()
    except (ValueError, TypeError, InvalidInput) as err:
        raise BadRequest(
            f"input '{tensor.name}': data does not fit shape {tensor.shape} ({err})"
        ) from err
    if len(items) != shape[0]:
        raise BadRequest(f"input '{tensor.name}' declares {shape[0]} images but holds {len(items)}")
    bad = [
        f"{tensor.name}[{i}] must be a string or bytes, got {json_type(item)}"
        for i, item in enumerate(items)
        if not isinstance(item, str | bytes)
    ]
    if bad:
        raise BadRequest(summarise(bad))
    return items


def v2_pixels(tensor: Any, image_size: int, limits: Limits) -> torch.Tensor:
    """A preprocessed FP32 input as the network's batch, after checking its shape."""
    shape = declared_shape(tensor)
    if len(shape) != 4 or shape[1:] != [3, image_size, image_size]:
        raise BadRequest(
            f"input '{tensor.name}' has shape {tensor.shape}; expected "
            f"{pixels_shape(image_size)}: N images, 3 channels, {image_size}x{image_size} "
            "pixels, preprocessed as in training"
        )
    check_batch_size(shape[0], f"input '{tensor.name}'", limits)
    try:
        array = np.asarray(tensor.as_numpy(), dtype=np.float32).reshape(shape)
    except (ValueError, TypeError, InvalidInput) as err:
        raise BadRequest(
            f"input '{tensor.name}': data does not fit shape {tensor.shape} ({err})"
        ) from err
    if not np.isfinite(array).all():
        raise BadRequest(f"input '{tensor.name}' holds NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(array))


def v2_response(
    request: InferRequest, assessment: Assessment, class_names: list[str], name: str, version: str
) -> InferResponse:
    rows = answers(assessment, class_names)
    probs = assessment.probabilities.masked_fill(assessment.not_brain_mri.unsqueeze(1), 0.0)
    count = len(rows)
    outputs = [
        InferOutput(LABEL_OUTPUT, [count], "BYTES", [r["label"] for r in rows]),
        InferOutput(
            PROBABILITIES_OUTPUT,
            shape=list(probs.shape),
            datatype="FP32",
            data=probs.numpy().astype(np.float32).reshape(-1).tolist(),
            parameters={"class_names": ",".join(class_names)},
        ),
        InferOutput(SET_OUTPUT, [count], "BYTES", [",".join(r["prediction_set"]) for r in rows]),
        InferOutput(UNCERTAIN_OUTPUT, [count], "BOOL", [r["uncertain"] for r in rows]),
    ]
    if not assessment.ood_scores.isnan().any():
        outputs.append(InferOutput(OOD_OUTPUT, [count], "FP32", assessment.ood_scores.tolist()))
    return InferResponse(
        response_id=request.id or generate_uuid(),
        model_name=name,
        model_version=version,
        infer_outputs=outputs,
        use_binary_outputs=request.use_binary_outputs,
        requested_outputs=request.request_outputs,
    )


# -- the REST binary extension -------------------------------------------------------------------


def read_binary_extension(body: bytes, header_length: str) -> tuple[bytes, int | None]:
    """A v2 REST request sent with the binary extension, checked and rewritten so KServe reads
    it correctly: every size, shape and element the JSON part declares is checked against the
    bytes that follow it (any mismatch is an :class:`InvalidInput` naming the input and the
    sizes); BYTES elements move into the JSON as base64 strings (KServe would decode them as
    UTF-8); fixed-size data (FP32) stays binary. Returns the new body and the length of its
    JSON part, or None when nothing binary is left (a plain JSON body)."""
    if not header_length.strip().isdigit():
        raise BadRequest(
            f"header '{BINARY_HEADER}' must be the byte length of the JSON part of the body, "
            f"got {header_length!r}"
        )
    json_length = int(header_length)
    if not 0 < json_length <= len(body):
        raise BadRequest(
            f"header '{BINARY_HEADER}' says the JSON part is {json_length} bytes, but the body "
            f"is {len(body)} bytes"
        )
    try:
        request = json.loads(body[:json_length])
    except (ValueError, UnicodeDecodeError) as err:
        raise BadRequest(
            f"the first {json_length} bytes of the body ('{BINARY_HEADER}') are not JSON: {err}"
        ) from err
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise BadRequest(
            "the JSON part of a binary request must be an object with an 'inputs' list"
        )
    offset, kept = json_length, []
    for index, tensor in enumerate(request["inputs"]):
        size = _binary_size(tensor, index)
        if size is None:
            continue  # its data is in the JSON; the model checks it
        if offset + size > len(body):
            raise BadRequest(
                f"input '{tensor['name']}': binary_data_size {size} runs past the end of the "
                f"body ({len(body) - offset} bytes left): truncated request"
            )
        raw = body[offset : offset + size]
        offset += size
        if _inline_or_check(tensor, raw):
            kept.append(raw)
    if offset != len(body):
        raise BadRequest(
            f"{len(body) - offset} bytes follow the inputs' binary data "
            "(parameters.binary_data_size of each input must add up to the rest of the body)"
        )
    header = json.dumps(request, separators=(",", ":")).encode()
    return (header + b"".join(kept), len(header)) if kept else (header, None)


def _binary_size(tensor: Any, index: int) -> int | None:
    """The input's ``binary_data_size`` (checked), or None when its data is inline."""
    if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
        raise BadRequest(f"inputs[{index}] must be an object with a string 'name'")
    parameters = tensor.get("parameters")
    if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
        return None
    size = parameters["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BadRequest(
            f"input '{tensor['name']}': binary_data_size must be a byte count, got {size!r}"
        )
    return size


def _inline_or_check(tensor: dict[str, Any], raw: bytes) -> bool:
    """Check one input's binary data against its shape; move BYTES data into the JSON (False),
    keep fixed-size data binary (True)."""
    name, datatype = tensor["name"], tensor.get("datatype")
    count = math.prod(declared_shape(_Declared(name, tensor.get("shape"))))
    if datatype == "BYTES":
        elements = _bytes_elements(raw, name)
        if len(elements) != count:
            raise BadRequest(
                f"input '{name}': shape {tensor['shape']} needs {count} elements, its binary "
                f"BYTES data holds {len(elements)}"
            )
        tensor["data"] = [_as_base64_text(e) for e in elements]
        del tensor["parameters"]["binary_data_size"]
        return False
    if datatype not in ELEMENT_BYTES:
        raise BadRequest(f"input '{name}' has datatype {datatype!r}; expected BYTES or FP32")
    if len(raw) != count * ELEMENT_BYTES[datatype]:
        raise BadRequest(
            f"input '{name}': shape {tensor['shape']} of {datatype} needs "
            f"{count * ELEMENT_BYTES[datatype]} bytes, binary_data_size is {len(raw)}"
        )
    return True


def _as_base64_text(element: bytes) -> str:
    """A BYTES element as the base64 text the model reads over REST: an encoded image (its
    first bytes are never base64) is encoded; text that already is base64 stays as it is."""
    try:
        text = element.decode("ascii")
        base64.b64decode(text, validate=True)
    except (UnicodeDecodeError, binascii.Error):
        return base64.b64encode(element).decode("ascii")
    return text


@dataclass(frozen=True)
class _Declared:
    """What :func:`declared_shape` reads of a tensor, for a JSON input."""

    name: str
    shape: Any


def _bytes_elements(raw: bytes, name: str) -> list[bytes]:
    """The elements of a BYTES tensor in the binary form: each a little-endian uint32 length
    and that many bytes."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            raise BadRequest(f"input '{name}': truncated BYTES element length at byte {offset}")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise BadRequest(
                f"input '{name}': BYTES element {len(elements)} says {length} bytes, "
                f"{len(raw) - offset} are left: truncated"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    return elements


# -- images ----------------------------------------------------------------------------------------


def decode_encoded(item: Encoded, max_pixels: int) -> Image.Image:
    """An encoded image (base64 text or raw bytes) as a decoded RGB image, or ValueError."""
    if isinstance(item, Problem):
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
    except Exception as err:  # PIL's decoders raise more kinds on crafted files (struct.error...)
        raise ValueError(f"not a readable image ({type(err).__name__}: {err})") from err


def _check_dimensions(data: bytes, max_pixels: int) -> None:
    """Refuse an image whose header announces more than ``max_pixels`` before decoding it."""
    try:
        if is_dicom(data):
            width, height = dicom_size(data)
        else:
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

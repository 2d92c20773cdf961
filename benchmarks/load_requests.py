"""The requests of ``make bench-load``'s mix, built once (no locust here, so tests and tools can
import them): valid images in the v1 JSON and the v2 binary forms, and every kind of bad input.

Configured by the environment: ``LOAD_MODEL`` (model name), ``LOAD_IMAGE_SIZE`` (its input size),
``LOAD_MAX_PAYLOAD`` (the server's payload limit, bytes).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib

MODEL = os.environ.get("LOAD_MODEL", "brain-mri-classifier")
IMAGE_SIZE = int(os.environ.get("LOAD_IMAGE_SIZE", "192"))
MAX_PAYLOAD = int(os.environ.get("LOAD_MAX_PAYLOAD", str(32 * 1024 * 1024)))
V1, V2 = f"/v1/models/{MODEL}:predict", f"/v2/models/{MODEL}/infer"
JSON = {"content-type": "application/json"}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def decompression_bomb(side: int = 60_000) -> bytes:
    """A small PNG whose header announces ``side`` x ``side`` pixels of greyscale zeros."""
    header = _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    rows = zlib.compress(b"\x00" * (side + 1) * 64, 9)  # the first rows; enough to start
    return b"\x89PNG\r\n\x1a\n" + header + _png_chunk(b"IDAT", rows) + _png_chunk(b"IEND", b"")


def binary_request(name: str, datatype: str, shape: list[int], raw: bytes) -> tuple[bytes, str]:
    header = {
        "inputs": [
            {
                "name": name,
                "datatype": datatype,
                "shape": shape,
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "outputs": [{"name": "label", "parameters": {"binary_data": False}}],
    }
    text = json.dumps(header).encode()
    return text + raw, str(len(text))


BOMB = decompression_bomb()
OVERSIZE = b'{"instances": [{"image_bytes": {"b64": "' + b"A" * (MAX_PAYLOAD + 1024) + b'"}}]}'
NOT_AN_IMAGE = base64.b64encode(os.urandom(4096)).decode()
WRONG_SHAPE = {
    "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}]
}
MINUS_ONE = binary_request(
    "pixels", "FP32", [-1, 3, IMAGE_SIZE, IMAGE_SIZE], bytes(8 * 3 * IMAGE_SIZE**2 * 4)
)


def v1_body(b64: str) -> bytes:
    return json.dumps({"instances": [{"image_bytes": {"b64": b64}}]}).encode()


def v2_binary_image(image: bytes) -> tuple[bytes, dict[str, str]]:
    body, length = binary_request(
        "image_bytes", "BYTES", [1], struct.pack("<I", len(image)) + image
    )
    return body, {"inference-header-content-length": length}


def requests_by_kind(image: bytes) -> dict[str, tuple[str, bytes, dict[str, str]]]:
    """One (path, body, headers) of each kind of the mix, the valid ones of ``image``."""
    minus_body, minus_length = MINUS_ONE
    return {
        "valid_v1": (V1, v1_body(base64.b64encode(image).decode()), JSON),
        "valid_v2_binary": (V2, *v2_binary_image(image)),
        "malformed_json": (V1, b'{"instances": [{"image_bytes": {"b64": "', JSON),
        "bad_base64": (V1, v1_body("not*base64!" * 20), JSON),
        "not_an_image": (V1, v1_body(NOT_AN_IMAGE), JSON),
        "decompression_bomb": (V1, v1_body(base64.b64encode(BOMB).decode()), JSON),
        "oversize_payload": (V1, OVERSIZE, JSON),
        "wrong_tensor_shape": (V2, json.dumps(WRONG_SHAPE).encode(), JSON),
        "minus_one_batch": (V2, minus_body, {"inference-header-content-length": minus_length}),
    }

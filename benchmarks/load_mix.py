"""The locust user of ``make bench-load`` (run by :mod:`benchmarks.bench_load`).

Each request is one kind of :func:`benchmarks.load_requests.requests_by_kind`, drawn with the
weights of :data:`MIX`: valid images (v1 JSON and v2 BYTES in the binary extension) mixed with
malformed JSON, bad base64, non-images, decompression bombs, oversize payloads, wrong tensor
shapes and ``-1`` batches. Every outcome is recorded by kind and status (0: no answer, with
the error) and written as JSON when the run stops, after ``LOAD_REQUESTS`` requests.

A client whose valid request is shed waits the ``Retry-After`` it was given (as the 429 asks;
``LOAD_HONOUR_RETRY_AFTER=0`` turns that off); hostile requests never wait.

Configured by the environment: ``LOAD_REQUESTS``, ``LOAD_RESULT`` (JSON path), ``LOAD_IMAGES``
(a folder of encoded images), ``LOAD_HONOUR_RETRY_AFTER``, and what
:mod:`benchmarks.load_requests` reads.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter, defaultdict
from pathlib import Path

import gevent
from locust import FastHttpUser, constant, events, task

from benchmarks.load_requests import requests_by_kind

TOTAL = int(os.environ.get("LOAD_REQUESTS", "10000"))
HONOUR_RETRY_AFTER = os.environ.get("LOAD_HONOUR_RETRY_AFTER", "1") == "1"
MIX = {  # kind: weight
    "valid_v1": 45,
    "valid_v2_binary": 10,
    "malformed_json": 8,
    "bad_base64": 8,
    "not_an_image": 8,
    "decompression_bomb": 6,
    "oversize_payload": 2,
    "wrong_tensor_shape": 8,
    "minus_one_batch": 5,
}
VALID = ("valid_v1", "valid_v2_binary")


def _requests() -> list[dict[str, tuple[str, bytes, dict[str, str]]]]:
    folder = Path(os.environ.get("LOAD_IMAGES", ""))
    files = sorted(p for p in folder.glob("*") if p.is_file()) if folder.is_dir() else []
    if not files:
        raise SystemExit(f"LOAD_IMAGES={folder} holds no images")
    return [requests_by_kind(p.read_bytes()) for p in files]


REQUESTS = _requests()
sent = 0
stopping = False
outcomes: dict[str, Counter] = defaultdict(Counter)
errors: dict[str, Counter] = defaultdict(Counter)
latencies_ms: dict[str, list[float]] = defaultdict(list)


class MixedTraffic(FastHttpUser):
    """One client of the mix: requests back to back on one connection, no think time."""

    wait_time = constant(0)
    connection_timeout = 30.0
    network_timeout = 60.0

    @task
    def one_request(self) -> None:
        global sent
        if sent >= TOTAL:
            global stopping
            if not stopping and self.environment.runner is not None:
                stopping = True
                gevent.spawn(self.environment.runner.quit)  # not from this user's own greenlet
            gevent.sleep(1)
            return
        sent += 1
        kind = random.choices(list(MIX), weights=list(MIX.values()))[0]
        path, body, headers = random.choice(REQUESTS)[kind]
        started = time.perf_counter()
        with self.client.post(
            path, data=body, headers=headers, name=kind, catch_response=True
        ) as response:
            elapsed_ms = (time.perf_counter() - started) * 1000
            status = response.status_code or 0
            outcomes[kind][str(status)] += 1
            if status == 0:
                errors[kind][type(response.error).__name__] += 1
            if kind in VALID and status == 200:
                latencies_ms[kind].append(round(elapsed_ms, 2))
            response.success()  # outcomes are judged by the benchmark, not by locust
            retry_after = response.headers.get("retry-after") if status == 429 else None
        if retry_after and kind in VALID and HONOUR_RETRY_AFTER:
            gevent.sleep(float(retry_after))  # a well-behaved client; the hostile ones never wait


@events.quitting.add_listener
def write_result(environment: object, **kwargs: object) -> None:
    path = os.environ.get("LOAD_RESULT")
    if path:
        result = {
            "sent": sent,
            "outcomes": {k: dict(v) for k, v in outcomes.items()},
            "errors": {k: dict(v) for k, v in errors.items()},
            "latencies_ms": dict(latencies_ms),
        }
        Path(path).write_text(json.dumps(result))

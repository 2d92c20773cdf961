"""Serving benchmark: the real model server under a bounded load, against raw forward passes.

    python -m benchmarks.bench_serve [--model-dir DIR | --stand-in [--image-size 128]]
        [--concurrency 1 8 32] [--batch-sizes 1] [--images-per-setting 1536]
        [--variants eager onnxruntime openvino "openvino + batching" ...]

Every server variant (:data:`VARIANTS`: eager PyTorch, ONNX Runtime and OpenVINO, each of the
two with and without request batching) is started in turn on the same bundle (exported as ONNX
first when it was trained before training exported it), its cold start (process start -> ready)
recorded, and driven alike; the client honours 429 by sending again after a twentieth of
``Retry-After`` (counted as ``shed``, not as errors). The goals compare, in the same run, the
fastest variant's single-image throughput at concurrency 8 with the eager server's (>= 4x) and
with its runtime's raw batched forward (>= 0.8x), p99 with p50 at concurrency 1 and 8 (<= 2x),
and cold start (<= 5 s).

1. Measures, in this process and before the server starts, the raw batched forward throughput
   of the same model (``ModelBundle.predict_proba`` on preprocessed tensors, the server's own
   forward call, its runtime given a stream per CPU thread as the server's is) at each batch
   size, from one thread on one and on all CPU threads and from a thread per CPU thread at once,
   and again after the server has run (the best of these is the reference), and for
   information decode + preprocess + forward in one thread.
2. Starts ``python -m serving`` on the model as a subprocess on 127.0.0.1 and drives
   ``POST /v1/models/<name>:predict`` with real encoded MRI slices (``../shared/data``, else
   synthetic 512 px JPEGs): for each batch size and concurrency a fixed number of images, sent
   by that many threads over keep-alive connections, each setting capped in time as well.
   Then, for reference, ``/v2/models/<name>/infer`` with the same images already preprocessed
   (FP32 tensors in the binary extension), largest batch, concurrency 8.
3. Profiles the fastest variant with py-spy at concurrency 8 (CPU cores per part of the server;
   what the runtime's native threads use is the server's CPU no Python thread accounts for).
4. Compares each runtime with eager PyTorch on the held-out test split of ``--data`` (split as
   bench-accuracy splits it), after quantising the network to INT8 on training images: label
   agreement, largest probability difference, paired counts with McNemar's p, and whether it
   may be served (fp32: equivalent; bf16 and INT8: at most 0.1 point of accuracy lost).
5. Reports p50/p95/p99 latency and images/s per setting, checks the goals and writes
   ``benchmarks/results/serve.json``.

The model is what users serve: by default the EfficientNet-Lite0 that ``make bench-accuracy``
trained (seed 0 of the default recipe, in ``local_outputs/bench/trained-model``), with its
input size and test-time flip; the benchmark refuses to run without it. ``--stand-in`` serves a
freshly initialised ``tiny_cnn`` at ``--image-size`` instead, a quick check of the server's own
overhead whose figures are not the served model's (the result says which ran). Client and
server share this machine's CPUs; each setting records how many CPU cores each of them kept busy,
and the load average before and after is recorded too, so contention from other work on the
machine shows in the results.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import re
import signal
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kserve import InferInput, InferRequest

from benchmarks import serve_profile
from benchmarks.bench_accuracy import prepare_default_split
from benchmarks.common import (
    RESULTS_DIR,
    SHARED_TRAINING,
    TRAINED_MODEL_DIR,
    cpu_seconds,
    load_images,
    write_json,
)
from brainmri import CLASS_NAMES
from brainmri.cpu import cpu_budget
from brainmri.dataset import load_image_set
from brainmri.images import PreprocessConfig, decode_image
from brainmri.model import ModelBundle, build_model
from components.runtime_check import compare_runtimes, quantise_bundle
from serving.process import ServerProcess, serve_in_subprocess

RESULT_PATH = RESULTS_DIR / "serve.json"
MODEL_NAME = "bench"
THROUGHPUT_GOAL = 0.8  # served images/s at concurrency 8 over its runtime's raw batched forward
SPEEDUP_GOAL = 4.0  # ... and over the eager server's, in the same run
TAIL_GOAL = 2.0  # p99 over p50 at concurrency 1 and 8
COLD_START_GOAL_S = 5.0  # process start -> ready
TAIL_CONCURRENCY = 8
POOL_SIZE = 64  # distinct images cycled through the requests
IMAGE_PROTOCOL = "v1 images"
EAGER_VARIANT = "eager"
# the servers compared: each runtime, and the fastest with request batching
BATCHING = ["--max_batch_latency_ms", "2"]
VARIANT_RUNTIME = {
    EAGER_VARIANT: "torch",
    "onnxruntime": "onnxruntime",
    "openvino": "openvino",
    "onnxruntime + batching": "onnxruntime",
    "openvino + batching": "openvino",
}
VARIANTS = {
    variant: ["--runtime", runtime, *(BATCHING if "batching" in variant else [])]
    for variant, runtime in VARIANT_RUNTIME.items()
}
# the server's CPU (from /proc) that no Python thread's samples account for
NATIVE_THREADS = "runtime's native threads (server CPU not in Python threads)"
# the runtimes compared with eager PyTorch on the held-out split; fp32 ones must be equivalent,
# reduced-precision ones may cost at most QUANTISED_ACCURACY_LOSS of paired accuracy
EQUIVALENCE_RUNTIMES = {
    "onnxruntime": "fp32",
    "openvino": "fp32",
    "openvino-bf16": "reduced",
    "openvino-int8": "reduced",
}
INT8_CALIBRATION_IMAGES = 300


@dataclass(frozen=True)
class Setting:
    """One load setting's outcome."""

    protocol: str
    concurrency: int
    batch_size: int
    requests: int
    images: int
    errors: int
    seconds: float
    images_per_s: float
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float
    server_cores: float  # CPU seconds the server used per second of the setting
    client_cores: float  # the same for this load generator
    first_error: str | None = None
    shed: int = 0  # answered 429 (sent again after Retry-After; not counted as errors)
    variant: str = ""  # the server variant (runtime, batching) it ran against


# -- inputs ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Load:
    """What one setting sends: pre-serialised bodies for one endpoint."""

    protocol: str
    batch_size: int
    path: str
    headers: dict[str, str]
    bodies: list[bytes]


def image_load(images: list[bytes], batch_size: int) -> Load:
    """v1 bodies of ``batch_size`` base64 images each, cycling through ``images``."""
    encoded = [base64.b64encode(img).decode("ascii") for img in images]
    bodies = []
    for start in range(0, max(len(encoded), batch_size * 4), batch_size):
        chosen = [encoded[(start + k) % len(encoded)] for k in range(batch_size)]
        body = {"instances": [{"image_bytes": {"b64": b64}} for b64 in chosen]}
        bodies.append(json.dumps(body).encode())
    path = f"/v1/models/{MODEL_NAME}:predict"
    return Load(IMAGE_PROTOCOL, batch_size, path, {"Content-Type": "application/json"}, bodies)


def pixels_load(bundle: ModelBundle, images: list[bytes], batch_size: int) -> Load:
    """v2 bodies of ``batch_size`` preprocessed FP32 images each, in the binary extension."""
    pixels = [bundle.preprocess(decode_image(img)).numpy() for img in images]
    bodies, json_lengths = [], set()
    for start in range(0, max(len(pixels), batch_size * 4), batch_size):
        batch = np.stack([pixels[(start + k) % len(pixels)] for k in range(batch_size)])
        tensor = InferInput("pixels", list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch, binary_data=True)
        body, json_length = InferRequest(model_name=MODEL_NAME, infer_inputs=[tensor]).to_rest()
        bodies.append(body)
        json_lengths.add(json_length)
    (json_length,) = json_lengths  # same shape, same JSON header
    headers = {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(json_length),
    }
    path = f"/v2/models/{MODEL_NAME}/infer"
    return Load("v2 FP32 tensors", batch_size, path, headers, bodies)


def answers(data: bytes) -> int:
    """How many images a v1 or v2 response answers."""
    reply = json.loads(data)
    if "predictions" in reply:
        return len(reply["predictions"])
    return next(o["shape"][0] for o in reply["outputs"] if o["name"] == "label")


def exported_copy(model_dir: Path, copy: Path) -> Path:
    """A copy of the bundle with its network exported as ONNX (what training writes today; a
    bundle trained before it has none)."""
    bundle = ModelBundle.load(model_dir, "cpu")
    return bundle.save(copy, export=True)


def make_bundle(directory: Path, image_size: int) -> Path:
    torch.manual_seed(0)
    bundle = ModelBundle(
        build_model("tiny_cnn", len(CLASS_NAMES)),
        "tiny_cnn",
        list(CLASS_NAMES),
        PreprocessConfig(image_size=image_size),
        {"version": "bench"},
    )
    return bundle.save(directory)


# -- in-process references ---------------------------------------------------------------------
def raw_forward(
    bundle: ModelBundle, batch_size: int, images: int, max_s: float, callers: int = 1
) -> float:
    """Images/s of ``bundle.predict_proba`` on a ready preprocessed batch (no decoding), called
    from ``callers`` threads at once: the median of three runs of up to ``images`` images or
    ``max_s / 3`` seconds each."""
    size = bundle.preprocess.image_size
    batch = torch.randn(batch_size, 3, size, size)

    def forward_until(deadline: float, budget: int) -> int:
        done = 0
        while done < budget and time.perf_counter() < deadline:
            bundle.predict_proba(batch)
            done += batch_size
        return done

    rates = []
    with ThreadPoolExecutor(callers) as pool:
        warm_up = time.perf_counter() + 60
        list(pool.map(forward_until, [warm_up] * callers, [3 * batch_size] * callers))
        for _ in range(3):
            started = time.perf_counter()
            deadlines = [started + max_s / 3] * callers
            done = sum(pool.map(forward_until, deadlines, [images // callers] * callers))
            rates.append(done / (time.perf_counter() - started))
    return float(np.median(rates))


def raw_settings() -> list[tuple[int, int]]:
    """(threads calling at once, torch threads) of the raw forward: one caller on one and on
    every CPU thread, and one caller per CPU thread, as the server's forward workers run."""
    budget = cpu_budget()
    return sorted({(1, 1), (1, budget), (budget, 1)})


def measure_raw(
    bundle: ModelBundle,
    best: dict[int, float],
    rows: dict[int, dict[str, Any]],
    when: str,
    images: int,
) -> None:
    """Raw forward at each batch size in each of :func:`raw_settings` (the bundle's runtime was
    loaded with a stream per CPU thread); ``best`` keeps the highest rate per batch size, so
    noise from other work on the machine cannot make the reference look slow (it is measured
    before and after the server runs)."""
    for batch_size, row in rows.items():
        for callers, threads in raw_settings():
            torch.set_num_threads(threads)
            rate = raw_forward(bundle, batch_size, images * 2, 6.0, callers)
            row[f"images_per_s_{callers}_callers_{threads}_threads_{when}"] = round(rate, 1)
            best[batch_size] = max(best.get(batch_size, 0.0), rate)
        print(f"raw forward {when}, batch {batch_size}: {row}", flush=True)


def decode_and_forward(
    bundle: ModelBundle, encoded: list[bytes], batch_size: int, images: int, max_s: float
) -> float:
    """Images/s of decode + preprocess + forward, one thread: the work behind each request."""
    done, started, index = 0, time.perf_counter(), 0
    while done < images and time.perf_counter() - started < max_s:
        chunk = [encoded[(index + k) % len(encoded)] for k in range(batch_size)]
        index += batch_size
        bundle.predict_proba(torch.stack([bundle.preprocess(decode_image(c)) for c in chunk]))
        done += batch_size
    return done / (time.perf_counter() - started)


# -- the server --------------------------------------------------------------------------------
def model_server(
    model_dir: Path, extra_args: list[str], log_path: Path, **options: Any
) -> AbstractContextManager[ServerProcess]:
    """``python -m serving`` on 127.0.0.1 with gRPC off, once ready (``options``: those of
    :func:`serve_in_subprocess`)."""
    args = ["--model-name", MODEL_NAME, "--model-dir", str(model_dir), "--enable_grpc", "false"]
    return serve_in_subprocess([*args, *extra_args], log_path, **options)


def profiled_pid(profiler: int) -> int:
    """The server's pid under ``py-spy record`` (its child), whose CPU the setting counts."""
    children = Path(f"/proc/{profiler}/task/{profiler}/children").read_text().split()
    return int(children[0]) if children else profiler


def profile_server(
    model_dir: Path, flags: list[str], images: list[bytes], seconds: float, tmp: Path
) -> dict[str, Any]:
    """CPU cores per part of the server (all threads' busy samples, then the GIL holder's) while
    it answers single v1 images at concurrency 8 for ``seconds``, from py-spy."""
    if serve_profile.py_spy() is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    profile: dict[str, Any] = {"concurrency": TAIL_CONCURRENCY, "seconds": seconds}
    load = image_load(images, 1)
    for what, gil in (("cores_busy", False), ("cores_holding_the_gil", True)):
        raw = tmp / f"profile-{what}.txt"
        options = {"prefix": serve_profile.record_command(raw, gil), "stop_signal": signal.SIGINT}
        with model_server(model_dir, flags, tmp / f"profile-{what}.log", **options) as server:
            started = time.perf_counter()
            pid = profiled_pid(server.process.pid)
            setting = drive(server.port, pid, load, TAIL_CONCURRENCY, 10**9, seconds)
            measured = time.perf_counter() - started
        profile[what] = serve_profile.summarise(raw, measured)
        if not gil:  # a runtime's own native threads run no Python: py-spy cannot see them
            unseen = setting.server_cores - sum(profile[what].values())
            profile[what][NATIVE_THREADS] = round(max(0.0, unseen), 3)
        profile[f"images_per_s_{what}"] = setting.images_per_s  # under the profiler
        print(f"profile ({what}): {profile[what]}", flush=True)
    return profile


def runtime_equivalence(model_dir: Path, data: Path, work: Path) -> dict[str, Any]:
    """Each runtime against eager PyTorch on the held-out test split of the real data, split as
    bench-accuracy splits it (grouped), after adding to ``model_dir`` the INT8 network calibrated
    on training images: label agreement, probability difference, paired counts (McNemar), its raw
    batch-1 forward, and whether it may be served."""
    _, dataset, split = prepare_default_split(data, work)
    eager = ModelBundle.load(model_dir, "cpu")
    train = split[split["split"] == "train"]
    train = train.sample(min(INT8_CALIBRATION_IMAGES, len(train)), random_state=0)
    names = list(CLASS_NAMES)
    calibration = load_image_set(dataset, train, names, eager.preprocess, desc="calibration")
    test_rows = split[split["split"] == "test"]
    test = load_image_set(dataset, test_rows, names, eager.preprocess, desc="test")
    quantise_bundle(model_dir, calibration.images)
    torch.set_num_threads(1)
    rows: dict[str, Any] = {"images": len(test), "eager_errors": None}
    for runtime, kind in EQUIVALENCE_RUNTIMES.items():
        candidate = ModelBundle.load(model_dir, "cpu", runtime=runtime, threads=1)
        agreement = compare_runtimes(eager, candidate, test.images, test.labels)
        rows["eager_errors"] = agreement.paired.first_errors
        kept = agreement.equivalent if kind == "fp32" else agreement.quantisation_acceptable
        rows[runtime] = agreement.to_dict() | {
            "precision": kind,
            "may_be_served": kept,
            "raw_images_per_s_batch_1": round(raw_forward(candidate, 1, 400, 6.0), 1),
        }
        print(f"equivalence {runtime}: {rows[runtime]}", flush=True)
    return rows


def server_threads(log_path: Path) -> str:
    """The server's own report of its thread pools (from its log)."""
    found = re.search(r"\d+ forward pass\S* at once.*decode thread\S*", log_path.read_text())
    return found.group(0) if found else "unknown"


def drive(
    port: int,
    pid: int,
    load: Load,
    concurrency: int,
    requests: int,
    max_s: float,
) -> Setting:
    """Send ``requests`` requests from ``concurrency`` threads (or stop after ``max_s``)."""
    path, headers, bodies, batch_size = load.path, load.headers, load.bodies, load.batch_size
    lock = threading.Lock()
    issued, shed = [0], [0]
    latencies: list[float] = []
    errors: list[str] = []
    stop_at = time.perf_counter() + max_s

    def worker() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
        while True:
            with lock:
                index = issued[0]
                if index >= requests or time.perf_counter() > stop_at:
                    break
                issued[0] += 1
            body = bodies[index % len(bodies)]
            started = time.perf_counter()
            try:
                connection.request("POST", path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as err:
                errors.append(f"{type(err).__name__}: {err}")
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
                continue
            elapsed = time.perf_counter() - started
            if response.status == 429:  # shed: back off as the server asks, then send again
                shed[0] += 1
                time.sleep(min(float(response.getheader("Retry-After") or 1), 1.0) / 20)
                with lock:
                    issued[0] -= 1
                continue
            if response.status != 200:
                errors.append(f"HTTP {response.status}: {data[:200]!r}")
            elif answers(data) != batch_size:
                errors.append("wrong number of answers")
            else:
                latencies.append(elapsed)
        connection.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    server_cpu, client_cpu = cpu_seconds(pid), time.process_time()
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    cores = (
        (cpu_seconds(pid) - server_cpu) / seconds,
        (time.process_time() - client_cpu) / seconds,
    )
    return _setting(load, concurrency, latencies, errors, seconds, cores, shed[0])


def _setting(
    load: Load,
    concurrency: int,
    latencies: list[float],
    errors: list[str],
    seconds: float,
    cores: tuple[float, float],
    shed: int = 0,
) -> Setting:
    """One setting's figures from its answered requests' latencies (s) and its errors."""
    batch_size = load.batch_size
    ms = np.asarray(latencies or [float("nan")]) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return Setting(
        protocol=load.protocol,
        concurrency=concurrency,
        batch_size=batch_size,
        requests=len(latencies),
        images=len(latencies) * batch_size,
        errors=len(errors),
        seconds=round(seconds, 3),
        images_per_s=round(len(latencies) * batch_size / seconds, 1),
        requests_per_s=round(len(latencies) / seconds, 1),
        p50_ms=round(float(p50), 2),
        p95_ms=round(float(p95), 2),
        p99_ms=round(float(p99), 2),
        mean_ms=round(float(np.mean(ms)), 2),
        max_ms=round(float(np.max(ms)), 2),
        server_cores=round(cores[0], 2),
        client_cores=round(cores[1], 2),
        first_error=errors[0] if errors else None,
        shed=shed,
    )


# -- report ------------------------------------------------------------------------------------
def fastest(settings: list[Setting]) -> tuple[Setting, int]:
    """The fastest setting on single v1 images at concurrency 8 (the highest level of a smoke
    run without it), and that level."""
    single = [s for s in settings if s.protocol == IMAGE_PROTOCOL and s.batch_size == 1]
    levels = {s.concurrency for s in single}
    loaded = TAIL_CONCURRENCY if TAIL_CONCURRENCY in levels else max(levels)
    return max((s for s in single if s.concurrency == loaded), key=lambda s: s.images_per_s), loaded


def goals(
    raw: dict[str, dict[int, float]], settings: list[Setting], cold_starts: dict[str, float]
) -> dict[str, Any]:
    """The goals on single images at concurrency 8 (what cluster services send), for the
    fastest variant against the eager one of the same run and its runtime's raw forward."""
    single = [s for s in settings if s.protocol == IMAGE_PROTOCOL and s.batch_size == 1]
    at = {(s.variant, s.concurrency): s for s in single}
    best, loaded = fastest(settings)
    eager = at.get((EAGER_VARIANT, loaded))
    runtime = VARIANT_RUNTIME.get(best.variant, "torch")
    ceiling = max(raw.get(runtime, {0: 0.0}).values())
    tails = {
        str(c): round(at[(best.variant, c)].p99_ms / at[(best.variant, c)].p50_ms, 2)
        for c in sorted({1, loaded})
        if (best.variant, c) in at
    }
    speedup = best.images_per_s / eager.images_per_s if eager else None
    return {
        "best_variant_at_concurrency_8": best.variant,
        "images_per_s_at_concurrency_8": best.images_per_s,
        "over_eager_server": round(speedup, 2) if speedup else None,
        "over_eager_server_met": bool(speedup and speedup >= SPEEDUP_GOAL),
        "raw_batched_forward_of_its_runtime": round(ceiling, 1),
        "over_raw_forward": round(best.images_per_s / ceiling, 3) if ceiling else None,
        "over_raw_forward_met": bool(ceiling and best.images_per_s >= THROUGHPUT_GOAL * ceiling),
        "p99_over_p50": tails,
        "tail_met": bool(tails) and all(t <= TAIL_GOAL for t in tails.values()),
        "cold_start_s": cold_starts,
        # the goal is the chosen server's; the others are listed for comparison
        "cold_start_met": cold_starts.get(best.variant, 0.0) <= COLD_START_GOAL_S,
        "no_errors": all(s.errors == 0 for s in settings),
    }


def print_summary(result: dict[str, Any]) -> None:
    print("\nraw forward (best of one caller and of one per CPU thread, before and after):")
    for runtime, rows in result["raw_forward"].items():
        print(
            f"  {runtime}: "
            + ", ".join(f"batch {r['batch_size']} {r['images_per_s']}" for r in rows)
        )
    print("\nserver (HTTP on 127.0.0.1):")
    print(
        "  variant               input            conc batch  images/s   p50 ms   p99 ms  "
        "errors  shed  server/client CPU cores"
    )
    for s in result["server"]:
        print(
            f"  {s['variant']:<21} {s['protocol']:<16} {s['concurrency']:>4} {s['batch_size']:>5} "
            f"{s['images_per_s']:>9.1f} {s['p50_ms']:>8.1f} {s['p99_ms']:>8.1f} {s['errors']:>7} "
            f"{s['shed']:>5}  {s['server_cores']:>5.2f} / {s['client_cores']:.2f}"
        )
    equivalence = result["equivalence_on_the_held_out_split"]
    if "skipped" not in equivalence:
        print(f"\nagainst eager PyTorch on the held-out split ({equivalence['images']} images):")
        for runtime in EQUIVALENCE_RUNTIMES:
            row = equivalence[runtime]
            paired = row["paired"]
            print(
                f"  {runtime:14} labels agree {100 * row['label_agreement']:.2f} %, "
                f"max |dp| {row['max_probability_difference']:.2g}, accuracy "
                f"{-row['accuracy_loss_points']:+.2f} pt (eager only right "
                f"{paired['only_first_right']}, it only {paired['only_second_right']}, McNemar "
                f"p {paired['mcnemar_p']}), raw batch 1 {row['raw_images_per_s_batch_1']} img/s, "
                f"may be served: {row['may_be_served']}"
            )
    print(f"\ngoals: {json.dumps(result['goals'])}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_serve", description=__doc__)
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=TRAINED_MODEL_DIR,
        help="a saved bundle (default: bench-accuracy's trained model, %(default)s)",
    )
    parser.add_argument(
        "--stand-in",
        action="store_true",
        help="serve an untrained tiny_cnn instead (the server's overhead, not the model's figure)",
    )
    parser.add_argument("--image-size", type=int, default=128, help="input size of the stand-in")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--images-per-setting", type=int, default=1536)
    parser.add_argument("--max-seconds-per-setting", type=float, default=25.0)
    parser.add_argument("--torch-threads", type=int, help="server torch threads (default: its own)")
    parser.add_argument("--decode-workers", type=int, help="server decode threads")
    parser.add_argument("--forward-workers", type=int, help="server concurrent forward passes")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="one more flag for python -m serving (repeatable), e.g. --server-arg=--workers=2",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="the servers to measure, one after another",
    )
    parser.add_argument(
        "--profile-seconds",
        type=float,
        default=20.0,
        help="py-spy profile of the fastest variant at concurrency 8 for this long (0: none)",
    )
    parser.add_argument(
        "--data", type=Path, default=SHARED_TRAINING, help="real data for the equivalence check"
    )
    parser.add_argument(
        "--no-equivalence",
        dest="equivalence",
        action="store_false",
        help="skip comparing each runtime with eager PyTorch on the held-out split",
    )
    parser.add_argument("--output", type=Path, default=RESULT_PATH)
    return parser.parse_args(argv)


def server_flags(args: argparse.Namespace) -> list[str]:
    """The ``python -m serving`` flags the benchmark's own flags ask for."""
    flags = []
    for name in ("torch_threads", "decode_workers", "forward_workers"):
        if getattr(args, name):
            flags += [f"--{name}", str(getattr(args, name))]
    return flags + args.server_arg


def drive_server(
    server: ServerProcess,
    bundle: ModelBundle,
    images: list[bytes],
    args: argparse.Namespace,
    variant: str,
) -> list[Setting]:
    """Every setting (batch size x concurrency, then the FP32 reference), each after a warm-up."""
    runs = [(image_load(images, b), c) for b in args.batch_sizes for c in args.concurrency]
    # for reference only, and kept short: KServe 0.21 turns a binary REST tensor into a
    # Python list before the model sees it, which makes this path slow
    runs.append((pixels_load(bundle, images, max(args.batch_sizes)), TAIL_CONCURRENCY))
    settings = []
    for load, concurrency in runs:
        drive(server.port, server.process.pid, load, concurrency, concurrency * 2, 10.0)
        images_to_send = args.images_per_setting
        if load.protocol != IMAGE_PROTOCOL:
            images_to_send //= 6
        count = max(concurrency, images_to_send // load.batch_size)
        setting = drive(
            server.port, server.process.pid, load, concurrency, count, args.max_seconds_per_setting
        )
        setting = replace(setting, variant=variant)
        settings.append(setting)
        print(
            f"server {variant}, {load.protocol} c={concurrency} b={load.batch_size}: "
            f"{setting.images_per_s} images/s, p50 {setting.p50_ms} ms, "
            f"p99 {setting.p99_ms} ms, {setting.errors} errors",
            flush=True,
        )
    return settings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.stand_in and not (args.model_dir / "model.json").is_file():
        print(
            f"error: no trained model at {args.model_dir}: run `make bench-accuracy` first (it "
            "saves the default recipe's model there), pass --model-dir, or --stand-in for the "
            "server's overhead alone",
            file=sys.stderr,
        )
        return 2
    server_args = server_flags(args)
    load_before = os.getloadavg()
    images, source = load_images(POOL_SIZE)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        original = args.model_dir
        if args.stand_in:
            original = make_bundle(Path(tmp) / "stand-in", args.image_size)
        model_dir = exported_copy(original, Path(tmp) / "model")
        runtimes = sorted({VARIANT_RUNTIME[v] for v in args.variants})
        budget = cpu_budget()  # a stream per CPU thread, one thread each, as the server runs it
        bundles = {
            rt: ModelBundle.load(model_dir, "cpu", runtime=rt, threads=1, streams=budget)
            for rt in runtimes
        }
        bundle = bundles["torch"] if "torch" in bundles else next(iter(bundles.values()))
        raw_best: dict[str, dict[int, float]] = {rt: {} for rt in runtimes}
        raw_rows = {rt: {b: {"batch_size": b} for b in args.batch_sizes} for rt in runtimes}
        for rt in runtimes:
            measure_raw(bundles[rt], raw_best[rt], raw_rows[rt], "before", args.images_per_setting)
        settings, cold_starts, threads = [], {}, {}
        for variant in args.variants:
            server_log = Path(tmp) / f"server-{len(cold_starts)}.log"
            flags = [*VARIANTS[variant], *server_args]
            with model_server(model_dir, flags, server_log) as server:
                cold_starts[variant] = round(server.startup_s, 2)
                settings += drive_server(server, bundle, images, args, variant)
            threads[variant] = server_threads(server_log)
        equivalence: dict[str, Any] = {"skipped": "--no-equivalence"}
        if args.equivalence and not args.data.is_dir():
            equivalence = {"skipped": f"{args.data} missing: no held-out split to compare on"}
        elif args.equivalence:
            equivalence = runtime_equivalence(model_dir, args.data, Path(tmp) / "data")
        profile: dict[str, Any] = {}
        if args.profile_seconds > 0:
            variant = fastest(settings)[0].variant
            flags = [*VARIANTS[variant], *server_args]
            profile = {"variant": variant}
            profile |= profile_server(model_dir, flags, images, args.profile_seconds, Path(tmp))
        for rt in runtimes:
            measure_raw(bundles[rt], raw_best[rt], raw_rows[rt], "after", args.images_per_setting)
            for batch_size, row in raw_rows[rt].items():
                row["images_per_s"] = round(raw_best[rt][batch_size], 1)
    result = {
        "benchmark": "serve",
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 1),
        "host": {
            "cpu_count": os.cpu_count(),
            "cpu_budget": cpu_budget(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": "cpu",
        },
        "model": {
            "source": "stand-in: fresh tiny_cnn (untrained)" if args.stand_in else str(original),
            "test_time_flip": bundle.test_time_flip,
            "backbone": bundle.backbone,
            "image_size": bundle.preprocess.image_size,
        },
        "images": {
            "source": source,
            "distinct": len(images),
            "mean_bytes": round(float(np.mean([len(i) for i in images]))),
        },
        "server_command": " ".join(
            ["python -m serving --model-dir DIR --enable_grpc false", *server_args]
        ),
        "variants": {v: VARIANTS[v] for v in args.variants},
        "server_threads": threads,
        "raw_forward": {rt: list(rows.values()) for rt, rows in raw_rows.items()},
        "server": [asdict(s) for s in settings],
        "goals": goals(raw_best, settings, cold_starts),
        "profile": profile,
        "equivalence_on_the_held_out_split": equivalence,
    }
    write_json(result, args.output)
    print_summary(result)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

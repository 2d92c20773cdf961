"""Serving benchmark: the real model server under a bounded load, against raw forward passes.

    python -m benchmarks.bench_serve [--model-dir DIR | --stand-in [--image-size 128]]
        [--concurrency 1 8 32] [--batch-sizes 1 16] [--images-per-setting 1536]

1. Measures, in this process and before the server starts, the raw batched forward throughput
   of the same model (``ModelBundle.predict_proba`` on preprocessed tensors, the server's own
   forward call) at each batch size, with 1 and with all CPU threads, and again after the
   server has run (the best of these is the reference), and for information decode +
   preprocess + forward in one thread.
2. Starts ``python -m serving`` on the model as a subprocess on 127.0.0.1 and drives
   ``POST /v1/models/<name>:predict`` with real encoded MRI slices (``../shared/data``, else
   synthetic 512 px JPEGs): for each batch size and concurrency a fixed number of images, sent
   by that many threads over keep-alive connections, each setting capped in time as well.
   Then, for reference, ``/v2/models/<name>/infer`` with the same images already preprocessed
   (FP32 tensors in the binary extension), largest batch, concurrency 8.
3. Reports p50/p95/p99 latency and images/s per setting, checks the goals (server throughput
   at least 0.8x raw forward at the best batch size; p99 at most 2x p50 at concurrency 8) and
   writes ``benchmarks/results/serve.json``.

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
import sys
import tempfile
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from kserve import InferInput, InferRequest

from benchmarks.common import (
    RESULTS_DIR,
    TRAINED_MODEL_DIR,
    cpu_seconds,
    load_images,
    write_json,
)
from brainmri import CLASS_NAMES
from brainmri.cpu import cpu_budget
from brainmri.images import PreprocessConfig, decode_image
from brainmri.model import ModelBundle, build_model
from serving.process import ServerProcess, serve_in_subprocess

RESULT_PATH = RESULTS_DIR / "serve.json"
MODEL_NAME = "bench"
THROUGHPUT_GOAL = 0.8  # server images/s over raw forward images/s, best batch size each
TAIL_GOAL = 2.0  # p99 over p50 at concurrency 8
TAIL_CONCURRENCY = 8
POOL_SIZE = 64  # distinct images cycled through the requests
IMAGE_PROTOCOL = "v1 images"


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
def raw_forward(bundle: ModelBundle, batch_size: int, images: int, max_s: float) -> float:
    """Images/s of ``bundle.predict_proba`` on a ready preprocessed batch (no decoding): the
    median of three runs of up to ``images`` images or ``max_s / 3`` seconds each."""
    size = bundle.preprocess.image_size
    batch = torch.randn(batch_size, 3, size, size)
    for _ in range(3):
        bundle.predict_proba(batch)
    rates = []
    for _ in range(3):
        done, started = 0, time.perf_counter()
        while done < images and time.perf_counter() - started < max_s / 3:
            bundle.predict_proba(batch)
            done += batch_size
        rates.append(done / (time.perf_counter() - started))
    return float(np.median(rates))


def measure_raw(
    bundle: ModelBundle,
    best: dict[int, float],
    rows: dict[int, dict[str, Any]],
    when: str,
    images: int,
) -> None:
    """Raw forward at each batch size with 1 and with all CPU threads; ``best`` keeps the
    highest rate per batch size, so noise from other work on the machine cannot make the
    reference look slow (it is measured before and after the server runs)."""
    for batch_size, row in rows.items():
        for threads in sorted({1, cpu_budget()}):
            torch.set_num_threads(threads)
            rate = raw_forward(bundle, batch_size, images * 2, 6.0)
            row[f"images_per_s_{threads}_threads_{when}"] = round(rate, 1)
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
    model_dir: Path, extra_args: list[str], log_path: Path
) -> AbstractContextManager[ServerProcess]:
    """``python -m serving`` on 127.0.0.1 with gRPC off, once ready."""
    args = ["--model-name", MODEL_NAME, "--model-dir", str(model_dir), "--enable_grpc", "false"]
    return serve_in_subprocess([*args, *extra_args], log_path)


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
    issued = [0]
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
    return _setting(load, concurrency, latencies, errors, seconds, cores)


def _setting(
    load: Load,
    concurrency: int,
    latencies: list[float],
    errors: list[str],
    seconds: float,
    cores: tuple[float, float],
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
    )


# -- report ------------------------------------------------------------------------------------
def goals(raw: dict[int, float], settings: list[Setting]) -> dict[str, Any]:
    """The issue's goals, on the encoded-image settings (what clients send); the preprocessed
    tensor settings are reported beside them for reference."""
    best_raw_batch = max(raw, key=raw.get)
    reference = raw[best_raw_batch]
    images = [s for s in settings if s.protocol == IMAGE_PROTOCOL]
    tensors = [s for s in settings if s.protocol != IMAGE_PROTOCOL]
    best = max(images, key=lambda s: s.images_per_s)
    ratio = best.images_per_s / reference
    tails = {}
    for setting in images:
        if setting.concurrency == TAIL_CONCURRENCY:
            tail = setting.p99_ms / setting.p50_ms
            tails[str(setting.batch_size)] = {
                "p50_ms": setting.p50_ms,
                "p99_ms": setting.p99_ms,
                "p99_over_p50": round(tail, 2),
                "met": bool(tail <= TAIL_GOAL),
            }
    result: dict[str, Any] = {
        "throughput": {
            "target": f"best server images/s >= {THROUGHPUT_GOAL} x best raw forward images/s",
            "best_server_images_per_s": best.images_per_s,
            "best_server_setting": {"concurrency": best.concurrency, "batch_size": best.batch_size},
            "best_raw_images_per_s": round(reference, 1),
            "best_raw_batch_size": best_raw_batch,
            "ratio": round(ratio, 3),
            "met": bool(ratio >= THROUGHPUT_GOAL),
        },
        "tail_latency": {
            "target": f"p99 <= {TAIL_GOAL} x p50 at concurrency {TAIL_CONCURRENCY}",
            "per_batch_size": tails,
            "met": bool(tails) and all(t["met"] for t in tails.values()),
        },
        "no_errors": all(s.errors == 0 for s in settings),
    }
    if tensors:
        fastest = max(tensors, key=lambda s: s.images_per_s)
        result["tensor_input_reference"] = {
            "what": "v2 FP32 preprocessed tensors (no decoding in the server), not a goal",
            "best_server_images_per_s": fastest.images_per_s,
            "batch_size": fastest.batch_size,
            "ratio": round(fastest.images_per_s / reference, 3),
        }
    return result


def print_summary(result: dict[str, Any]) -> None:
    print("\nraw forward (predict_proba; best of 1 and all CPU threads, before and after):")
    for row in result["raw_forward"]:
        print(
            f"  batch {row['batch_size']:>3}: {row['images_per_s']:8.1f} images/s raw, "
            f"{row['decode_preprocess_forward_images_per_s']:8.1f} with decode+preprocess "
            "(one thread)"
        )
    print("\nserver (HTTP on 127.0.0.1):")
    print(
        "  input            conc batch  requests  images/s   p50 ms   p95 ms   p99 ms  errors  "
        "server/client CPU cores"
    )
    for s in result["server"]:
        print(
            f"  {s['protocol']:<16} {s['concurrency']:>4} {s['batch_size']:>5} {s['requests']:>9} "
            f"{s['images_per_s']:>9.1f} {s['p50_ms']:>8.1f} {s['p95_ms']:>8.1f} "
            f"{s['p99_ms']:>8.1f} {s['errors']:>7}  {s['server_cores']:>5.2f} / "
            f"{s['client_cores']:.2f}"
        )
    throughput, tail = result["goals"]["throughput"], result["goals"]["tail_latency"]
    print(
        f"\nthroughput goal: {throughput['best_server_images_per_s']} / "
        f"{throughput['best_raw_images_per_s']} = {throughput['ratio']}x "
        f"(>= {THROUGHPUT_GOAL}): {'MET' if throughput['met'] else 'NOT MET'}"
    )
    for batch, row in tail["per_batch_size"].items():
        print(
            f"tail goal, batch {batch}: p99/p50 = {row['p99_over_p50']} (<= {TAIL_GOAL}): "
            f"{'MET' if row['met'] else 'NOT MET'}"
        )
    tensors = result["goals"].get("tensor_input_reference")
    if tensors:
        print(
            f"for reference, preprocessed FP32 input: {tensors['best_server_images_per_s']} "
            f"images/s = {tensors['ratio']}x raw forward"
        )


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
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
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
    server: ServerProcess, bundle: ModelBundle, images: list[bytes], args: argparse.Namespace
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
        settings.append(setting)
        print(
            f"server {load.protocol} c={concurrency} b={load.batch_size}: "
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
        model_dir = (
            make_bundle(Path(tmp) / "model", args.image_size) if args.stand_in else args.model_dir
        )
        bundle = ModelBundle.load(model_dir, "cpu")
        raw: dict[int, float] = {}  # per batch size: the best of 1 and all CPU threads
        raw_rows = {b: {"batch_size": b} for b in args.batch_sizes}
        measure_raw(bundle, raw, raw_rows, "before", args.images_per_setting)
        for batch_size in args.batch_sizes:
            torch.set_num_threads(1)
            raw_rows[batch_size]["decode_preprocess_forward_images_per_s"] = round(
                decode_and_forward(bundle, images, batch_size, args.images_per_setting, 6.0), 1
            )
        server_log = Path(tmp) / "server.log"
        with model_server(model_dir, server_args, server_log) as server:
            settings = drive_server(server, bundle, images, args)
        threads = server_threads(server_log)
        measure_raw(bundle, raw, raw_rows, "after", args.images_per_setting)
        for batch_size, row in raw_rows.items():
            row["images_per_s"] = round(raw[batch_size], 1)
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
            "source": "stand-in: fresh tiny_cnn (untrained)" if args.stand_in else str(model_dir),
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
        "server_threads": threads,
        "raw_forward": list(raw_rows.values()),
        "server": [asdict(s) for s in settings],
        "goals": goals(raw, settings),
    }
    write_json(result, args.output)
    print_summary(result)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

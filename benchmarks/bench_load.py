"""Load test: the model server, started as the InferenceService starts it, under a hostile mix.

    python -m benchmarks.bench_load [--model-dir DIR] [--requests 10000] [--users 32]
        [--max-s 600] [--out PATH]

1. Starts ``python -m serving`` with the predictor container's own arguments (rendered by
   :func:`brainmri.inference_service.render_inference_service`, the bundle's folder standing in
   for ``/mnt/models``) on 127.0.0.1, serving the trained EfficientNet-Lite0 of the accuracy
   benchmark (``local_outputs/bench/trained-model``, or ``--model-dir``).
2. Measures the unloaded latency of valid requests (one at a time).
3. Runs locust headless (:mod:`benchmarks.load_mix`): ``--requests`` requests from ``--users``
   clients back to back, valid images mixed with malformed JSON, bad base64, non-images,
   decompression bombs, oversize payloads, wrong tensor shapes and ``-1`` batches, capped at
   ``--max-s`` seconds. Meanwhile a probe polls ``/v2/health/live`` as the kubelet would.
4. Reports, against the goals: 5xx answers (0), connection resets and failed valid requests
   (0), crashes or restarts (0), the server's peak RSS (at most 1.5 GB and below the pod's
   memory limit), and p50/p99 of the valid requests against the unloaded p99 (at most 2x);
   valid requests shed with 429 are counted apart. Writes ``benchmarks/results/load.json``.

Client and server share this machine's CPUs; the load average is recorded with the figures.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    TRAINED_MODEL_DIR,
    cpu_seconds,
    load_images,
    write_json,
)
from brainmri.inference_service import (
    MODEL_MOUNT_PATH,
    InferenceServiceSpec,
    render_inference_service,
)
from brainmri.model import ModelBundle
from serving.process import ServerProcess, serve_in_subprocess

RESULT_PATH = RESULTS_DIR / "load.json"
MODEL_NAME = "brain-mri-classifier"
GOALS = {
    "server_5xx": 0,
    "connection_errors": 0,
    "failed_valid_requests": 0,
    "crashes_or_restarts": 0,
    "peak_rss_gb": 1.5,
    "loaded_p99_over_unloaded_p99": 2.0,
}
PROBE_TIMEOUT_S = 5.0  # the liveness probe's timeoutSeconds in the shipped InferenceService


def container_args(model_dir: Path) -> tuple[list[str], dict[str, Any]]:
    """The predictor container's arguments (its model folder replaced by ``model_dir``, the
    port left to the caller) and the container itself."""
    manifest = render_inference_service(
        InferenceServiceSpec(MODEL_NAME, "bench", "s3://models/x", "predictor:bench", MODEL_NAME)
    )
    container = manifest["spec"]["predictor"]["containers"][0]
    args, kept = container["args"], []
    skip = False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg == "--http_port":
            skip = True
            continue
        kept.append(str(model_dir) if arg == MODEL_MOUNT_PATH else arg)
    return kept, container


def memory_limit_gb(container: dict[str, Any]) -> float:
    text = container["resources"]["limits"]["memory"]
    units = {"Gi": 2**30, "Mi": 2**20, "G": 1e9, "M": 1e6}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor / 1e9
    return float(text) / 1e9


def v1_request(port: int, image: bytes, verb: str = "predict") -> tuple[int, float]:
    body = json.dumps({"instances": [{"image_bytes": {"b64": base64.b64encode(image).decode()}}]})
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    started = time.perf_counter()
    connection.request(
        "POST", f"/v1/models/{MODEL_NAME}:{verb}", body, {"content-type": "application/json"}
    )
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status, (time.perf_counter() - started) * 1000


def unloaded_latency(
    port: int, images: list[bytes], count: int, verb: str = "predict"
) -> dict[str, float]:
    """p50/p99 of valid single-image v1 ``verb`` requests sent one at a time (after a short
    warm-up)."""
    for image in images[:5]:
        v1_request(port, image, verb)
    times = []
    for i in range(count):
        status, elapsed = v1_request(port, images[i % len(images)], verb)
        if status != 200:
            raise RuntimeError(f"unloaded request answered {status}")
        times.append(elapsed)
    return percentiles(times)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    array = np.asarray(values)
    return {
        "count": len(values),
        "p50_ms": round(float(np.percentile(array, 50)), 2),
        "p99_ms": round(float(np.percentile(array, 99)), 2),
        "max_ms": round(float(array.max()), 2),
    }


class LivenessProbe(threading.Thread):
    """Polls ``/v2/health/live`` every half second, as the kubelet's probe does."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.stopped = port, threading.Event()
        self.times: list[float] = []
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            started = time.perf_counter()
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, PROBE_TIMEOUT_S)
                connection.request("GET", "/v2/health/live")
                status = connection.getresponse().status
                connection.close()
                if status != 200:
                    self.failures.append(f"HTTP {status}")
            except OSError as err:
                self.failures.append(type(err).__name__)
            self.times.append((time.perf_counter() - started) * 1000)


TRACE = re.compile(r"kserve\.io\.v[12]\.models\.\S+ ([0-9.]+) \['http_status:200'.*'time:wall'\]")


def server_side_latencies(log: str) -> list[float]:
    """The wall time (ms) of every 200 answer to an inference request, from the server's log."""
    return [float(m.group(1)) * 1000 for m in TRACE.finditer(log)]


def peak_rss_gb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), in GB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError(f"no VmHWM for process {pid}")


def run_locust(
    server: ServerProcess, args: argparse.Namespace, image_dir: Path, image_size: int, out: Path
) -> dict[str, Any]:
    env = {
        **os.environ,
        "LOAD_REQUESTS": str(args.requests),
        "LOAD_RESULT": str(out),
        "LOAD_MODEL": MODEL_NAME,
        "LOAD_IMAGES": str(image_dir),
        "LOAD_IMAGE_SIZE": str(image_size),
        "LOAD_MAX_PAYLOAD": str(args.max_payload_bytes),
    }
    command = [
        sys.executable,
        "-m",
        "locust",
        "-f",
        str(REPO_ROOT / "benchmarks" / "load_mix.py"),
        "--headless",
        "--users",
        str(args.users),
        "--spawn-rate",
        str(args.users),
        "--run-time",
        f"{args.max_s}s",
        "--host",
        server.url,
        "--only-summary",
        "--loglevel",
        "WARNING",
        "--stop-timeout",
        "30",
    ]
    started, before = time.monotonic(), resource.getrusage(resource.RUSAGE_CHILDREN)
    server_before = cpu_seconds(server.process.pid)
    done = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=args.max_s + 120
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if not out.is_file():
        raise RuntimeError(
            f"locust wrote no result (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    result = json.loads(out.read_text())
    seconds = time.monotonic() - started
    client_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result["seconds"] = round(seconds, 1)
    result["server_cores"] = round((cpu_seconds(server.process.pid) - server_before) / seconds, 2)
    result["client_cores"] = round(client_cpu / seconds, 2)
    return result


def summarise(
    load: dict[str, Any], unloaded: dict[str, float], server: ServerProcess, limit_gb: float
) -> dict[str, Any]:
    """The figures and the goals they are held to."""
    outcomes = load["outcomes"]
    statuses = [(kind, int(s), n) for kind, counts in outcomes.items() for s, n in counts.items()]
    valid = {k: v for k, v in outcomes.items() if k.startswith("valid")}
    valid_total = sum(sum(c.values()) for c in valid.values())
    valid_ok = sum(c.get("200", 0) for c in valid.values())
    valid_shed = sum(c.get("429", 0) for c in valid.values())
    latencies = [ms for values in load["latencies_ms"].values() for ms in values]
    loaded = percentiles(latencies)
    alive = server.process.poll() is None
    figures = {
        "requests": load["sent"],
        "seconds": load["seconds"],
        "server_cores": load["server_cores"],  # CPU the server used, per second of the load
        "client_cores": load["client_cores"],  # the same for locust, on the same machine
        "server_5xx": sum(n for _, s, n in statuses if s >= 500),
        "connection_errors": sum(n for _, s, n in statuses if s == 0),
        "valid_requests": valid_total,
        "valid_answered": valid_ok,
        "valid_shed_429": valid_shed,
        "failed_valid_requests": valid_total - valid_ok - valid_shed,
        "crashes_or_restarts": 0 if alive else 1,
        "peak_rss_gb": round(peak_rss_gb(server.process.pid), 3) if alive else None,
        "pod_memory_limit_gb": round(limit_gb, 2),
        "unloaded": unloaded,
        "loaded_valid": loaded,
        "loaded_p50_over_unloaded_p99": round(loaded.get("p50_ms", 0) / unloaded["p99_ms"], 2),
        "loaded_p99_over_unloaded_p99": round(loaded.get("p99_ms", 0) / unloaded["p99_ms"], 2),
    }
    met = {
        "server_5xx": figures["server_5xx"] <= GOALS["server_5xx"],
        "connection_errors": figures["connection_errors"] <= GOALS["connection_errors"],
        "failed_valid_requests": figures["failed_valid_requests"] <= 0,
        "crashes_or_restarts": figures["crashes_or_restarts"] == 0,
        "peak_rss_gb": alive
        and figures["peak_rss_gb"] <= min(GOALS["peak_rss_gb"], figures["pod_memory_limit_gb"]),
        "loaded_p99_over_unloaded_p99": figures["loaded_p99_over_unloaded_p99"]
        <= GOALS["loaded_p99_over_unloaded_p99"],
    }
    return {"figures": figures, "goals": GOALS, "goals_met": met}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=TRAINED_MODEL_DIR)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--max-s", type=int, default=600, help="time cap of the load phase")
    parser.add_argument("--unloaded", type=int, default=200, help="requests measured unloaded")
    parser.add_argument("--out", type=Path, default=RESULT_PATH)
    parser.add_argument(
        "--levers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure the settings in LEVERS (half the requests each)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="an extra server flag (repeat; to measure a lever: the figure is the shipped args)",
    )
    parser.add_argument(
        "--allow-stand-in",
        action="store_true",
        help="accept a model that is not a trained EfficientNet-Lite0 (smoke runs only; such "
        "figures are not the benchmark's)",
    )
    return parser.parse_args(argv)


def check_model(model_dir: Path, allow_stand_in: bool) -> ModelBundle:
    if not (model_dir / "model.json").is_file():
        raise SystemExit(
            f"no model bundle at {model_dir}: run `make bench-accuracy` (it keeps its seed-0 "
            "model there) or pass --model-dir"
        )
    bundle = ModelBundle.load(model_dir)
    trained = bundle.backbone == "efficientnet_lite0" and bool(bundle.metadata.get("history"))
    if not (trained or allow_stand_in):
        raise SystemExit(
            f"{model_dir} holds a {bundle.backbone} at {bundle.preprocess.image_size} px "
            f"{'without' if not bundle.metadata.get('history') else 'with'} training history; "
            "the load figures are measured on the trained EfficientNet-Lite0 users run "
            "(--allow-stand-in for a smoke run)"
        )
    return bundle


LEVERS = {  # other admission and thread settings, measured in the same session (ratios compare)
    "2 serving slots": ["--max_inflight_requests", "2"],
    "3 serving slots": ["--max_inflight_requests", "3"],
    "1 forward worker x 2 torch threads": ["--forward_workers", "1", "--torch_threads", "2"],
}


def measure(
    args: argparse.Namespace,
    server_args: list[str],
    images: list[bytes],
    image_size: int,
    requests_count: int,
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """One load run against a fresh server: (result, load outcomes, server log tail)."""
    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        image_dir = Path(tmp) / "images"
        image_dir.mkdir()
        for i, image in enumerate(images):
            (image_dir / f"{i:03d}.img").write_bytes(image)
        log_path = Path(tmp) / "server.log"
        with serve_in_subprocess(server_args, log_path) as server:
            unloaded = unloaded_latency(server.port, images, args.unloaded)
            probe = LivenessProbe(server.port)
            probe.start()
            run = argparse.Namespace(**{**vars(args), "requests": requests_count})
            load = run_locust(server, run, image_dir, image_size, Path(tmp) / "out.json")
            probe.stopped.set()
            probe.join()
            result = summarise(load, unloaded, server, memory_limit_gb(args.container))
            tail = server.log_tail(2000)
            server_side = server_side_latencies(log_path.read_text(errors="replace"))
    figures = result["figures"]
    figures["liveness_probes"] = {
        "probes": len(probe.times),
        "failures": len(probe.failures),
        **{k: v for k, v in percentiles(probe.times).items() if k != "count"},
    }
    result["goals_met"]["liveness_never_failed"] = not probe.failures
    # the server's own timing of its 200 answers (KServe's outermost timing middleware: from
    # the request's arrival to its answer), to tell the server's time from the client's
    figures["server_side_answered"] = percentiles(server_side[-figures["valid_answered"] :])
    return result, load, tail


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bundle = check_model(args.model_dir, args.allow_stand_in)
    server_args, args.container = container_args(args.model_dir)
    server_args += args.server_arg
    args.max_payload_bytes = _flag_value(server_args, "--max_payload_bytes")
    images, image_source = load_images(64)
    load_before = os.getloadavg()
    size = bundle.preprocess.image_size
    result, load, server_log_tail = measure(args, server_args, images, size, args.requests)
    levers = {}
    for name, extra in LEVERS.items() if args.levers else ():
        lever, _, _ = measure(args, server_args + extra, images, size, args.requests // 2)
        keys = ("valid_answered", "valid_shed_429", "server_5xx", "seconds", "server_cores")
        levers[name] = {
            "server_args_added": extra,
            **{k: lever["figures"][k] for k in keys},
            "unloaded_p99_ms": lever["figures"]["unloaded"]["p99_ms"],
            "loaded_valid": lever["figures"]["loaded_valid"],
            "loaded_p99_over_unloaded_p99": lever["figures"]["loaded_p99_over_unloaded_p99"],
        }
    result.update(
        {
            "levers": levers,
            "outcomes_by_kind": load["outcomes"],
            "connection_errors_by_kind": load["errors"],
            "server_args": server_args,
            "model": {
                "dir": str(args.model_dir),
                "backbone": bundle.backbone,
                "image_size": bundle.preprocess.image_size,
                "version": bundle.metadata.get("version"),
                "trained": bool(bundle.metadata.get("history")),
            },
            "images": image_source,
            "users": args.users,
            "clients_honour_retry_after": True,
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
            },
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "server_log_tail": server_log_tail,
        }
    )
    write_json(result, args.out)
    print(json.dumps({"figures": result["figures"], "goals_met": result["goals_met"]}, indent=2))
    print(f"wrote {args.out}")
    return 0


def _flag_value(args: list[str], flag: str) -> int:
    """The value of ``flag`` in ``args``, else the server's default for it."""
    if flag in args:
        return int(args[args.index(flag) + 1])
    from serving.predictor import DEFAULT_MAX_PAYLOAD_BYTES

    return DEFAULT_MAX_PAYLOAD_BYTES


if __name__ == "__main__":
    sys.exit(main())

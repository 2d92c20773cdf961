"""``python -m serving``: load a model bundle and serve it with the KServe model server.

    python -m serving --model-name brain-mri --storage-uri s3://models/brain-mri/v3 \\
        [--http_port 8080] [--grpc_port 8081] [--max_batch_size 32] [--max_payload_bytes N]
    python -m serving --model_name brain-mri --model_dir /mnt/models   # KServe storage initializer

Flags of this program take either spelling, ``--storage-uri`` or ``--storage_uri``, and so does
``--model-name``; every standard KServe model-server flag (``--workers``, ``--enable_grpc``, ...)
is accepted in KServe's spelling. ``s3://`` URIs are read with the object-storage settings from
the environment (``S3_ENDPOINT``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``S3_USE_HTTPS``); anything else is a local directory such as ``/mnt/models``.

The HTTP port also serves ``/metrics`` (Prometheus), ``/v2/health/live`` and ``/v2/health/ready``.
"""

from __future__ import annotations

import argparse
import inspect
import sys

import torch
from kserve import ModelServer, model_server
from kserve import logging as kserve_logging
from kserve.logging import logger

from brainmri.cpu import cpu_budget
from brainmri.model import pick_device
from brainmri.runtimes import DEFAULT_RUNTIME, RUNTIMES
from brainmri.settings import SettingsError
from brainmri.storage import StorageError
from serving.limits import AdmissionLimits, AdmissionMiddleware
from serving.predictor import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_PAYLOAD_BYTES,
    REJECTED_REQUESTS,
    BrainMRIModel,
)
from serving.surface import (
    REPOSITORY_FLAG,
    RestFrontMiddleware,
    ServingDataPlane,
    close_model_repository,
    quiet_refusals,
)

DEFAULT_MAX_INFLIGHT_BYTES = 256 * 1024 * 1024
DEFAULT_BODY_TIMEOUT_S = 30.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _local_path(text: str) -> str:
    if "://" in text:
        raise argparse.ArgumentTypeError(
            f"{text!r} is a URI; --model_dir takes a local directory (use --storage_uri for URIs)"
        )
    return text


def build_parser() -> argparse.ArgumentParser:
    """KServe's model-server flags plus this server's (long: one declaration per flag)."""
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="Serve the brain-MRI tumour classifier (KServe v1 and v2 protocols).",
        parents=[model_server.parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # KServe's parser defines --model_name; this is its dashed spelling, same destination
    parser.add_argument(
        "--model-name",
        dest="model_name",
        default=argparse.SUPPRESS,
        help="Same as --model_name.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--storage_uri",
        "--storage-uri",
        dest="storage_uri",
        help="Model bundle location: s3://bucket/prefix (read with the S3_* / AWS_* settings "
        "from the environment), or a local directory holding model.json and model.pt.",
    )
    source.add_argument(
        "--model_dir",
        "--model-dir",
        dest="model_dir",
        type=_local_path,
        help="Local directory holding the bundle, e.g. /mnt/models where KServe's storage "
        "initializer puts the model named by the InferenceService's STORAGE_URI.",
    )
    limits = parser.add_argument_group("request limits (exceeding one is a 4xx naming it)")
    limits.add_argument(
        "--max_batch_size",
        "--max-batch-size",
        dest="max_batch_size",
        type=_positive_int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help="Most images in one request (one forward pass); larger requests get HTTP 400.",
    )
    limits.add_argument(
        "--max_payload_bytes",
        "--max-payload-bytes",
        dest="max_payload_bytes",
        type=_positive_int,
        default=DEFAULT_MAX_PAYLOAD_BYTES,
        help="Largest HTTP request body; larger ones get HTTP 413 before they are read. "
        "gRPC messages are capped by --grpc_max_receive_message_length instead.",
    )
    limits.add_argument(
        "--max_inflight_requests",
        "--max-inflight-requests",
        dest="max_inflight_requests",
        type=_positive_int,
        default=None,
        help="Most requests with a body served at once; beyond it HTTP 429 with Retry-After "
        "(shed, not queued). Default: half the forward workers, at least one (the rest of the "
        "CPU decodes, refuses bad input and answers probes; bench-load measures the others).",
    )
    limits.add_argument(
        "--max_inflight_bytes",
        "--max-inflight-bytes",
        dest="max_inflight_bytes",
        type=_positive_int,
        default=DEFAULT_MAX_INFLIGHT_BYTES,
        help="Most bytes of request bodies held at once; beyond it HTTP 429 with Retry-After.",
    )
    limits.add_argument(
        "--body_timeout_s",
        "--body-timeout-s",
        dest="body_timeout_s",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_S,
        help="How long a request body may take to arrive; slower ones get HTTP 408.",
    )
    limits.add_argument(
        REPOSITORY_FLAG,
        "--enable-model-repository-api",
        dest="enable_model_repository_api",
        action="store_true",
        help="Open KServe's unauthenticated model load/unload API (closed by default: one "
        "unload would take the model away). For trusted networks only.",
    )
    limits.add_argument(
        "--max_image_pixels",
        "--max-image-pixels",
        dest="max_image_pixels",
        type=_positive_int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        help="Most pixels of one image, checked from its header before decoding.",
    )
    threads = parser.add_argument_group(
        "threads (defaults fit the CPU budget: affinity and cgroup quota, not every core of "
        "the node as torch would assume)"
    )
    threads.add_argument(
        "--decode_workers",
        "--decode-workers",
        dest="decode_workers",
        type=_positive_int,
        default=None,
        help="Threads that decode and preprocess images. Default: the CPU budget.",
    )
    threads.add_argument(
        "--forward_workers",
        "--forward-workers",
        dest="forward_workers",
        type=_positive_int,
        default=None,
        help="Forward passes that may run at once. Default: the CPU budget on a CPU (several "
        "single-threaded passes keep the cores busier than one multi-threaded pass), 1 on a GPU.",
    )
    limits.add_argument(
        "--max_batch_latency_ms",
        "--max-batch-latency-ms",
        dest="max_batch_latency_ms",
        type=float,
        default=0.0,
        help="Batch the images of concurrent requests into one forward pass, up to "
        "--max_batch_size images or until the first has waited this long; 0 = off (each "
        "request its own pass). With it on, the default serving slots are --max_batch_size per "
        "forward worker, so that requests can wait together.",
    )
    threads.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=None,
        help="What runs the forward pass on the bundle's exported model.onnx. Default: eager "
        "PyTorch on a GPU, else ONNX Runtime (the "
        "fastest on 2 CPU cores of those that answer as eager PyTorch does; make bench-serve), "
        "OpenVINO (served within a few per cent of it), OpenVINO in bf16 or INT8 (not "
        "equivalent: they change held-out answers), or eager PyTorch; a bundle without "
        "model.onnx is served eagerly.",
    )
    threads.add_argument(
        "--torch_threads",
        "--torch-threads",
        dest="torch_threads",
        type=_positive_int,
        default=None,
        help="torch intra-op threads of each forward pass. Default: the CPU budget divided "
        "among the forward workers.",
    )
    return parser


def forward_threads(
    device: torch.device, forward_workers: int | None, torch_threads: int | None
) -> tuple[int, int]:
    """(forward passes at once, torch threads each): the flags, or defaults for ``device``."""
    budget = cpu_budget()
    if forward_workers is None:
        forward_workers = 1 if device.type != "cpu" else budget
    if torch_threads is None:
        torch_threads = budget if device.type != "cpu" else max(1, budget // forward_workers)
    return forward_workers, torch_threads


def default_runtime(device: torch.device) -> str:
    """The runtime when --runtime is not given: the CPU runtimes run on the CPU only, so a GPU
    gets eager PyTorch on CUDA."""
    return DEFAULT_RUNTIME if device.type == "cpu" else "torch"


def default_inflight(args: argparse.Namespace, model: BrainMRIModel) -> int:
    """Serving slots when --max_inflight_requests is not given: half the forward workers (at
    least one), or a full batch per forward worker when requests are batched."""
    if args.max_batch_latency_ms > 0:
        return args.max_batch_size * model.forward_workers
    return max(1, model.forward_workers // 2)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers != 1:
        parser.error(
            f"--workers {args.workers}: this server's request limits and guards live in one "
            "process; serve with --workers 1 and scale with replicas"
        )
    if args.configure_logging:
        kserve_logging.configure_logging(args.log_config_file)
    location = args.storage_uri or args.model_dir
    device = pick_device()
    forward_workers, torch_threads = forward_threads(
        device, args.forward_workers, args.torch_threads
    )
    torch.set_num_threads(torch_threads)
    model = BrainMRIModel(
        args.model_name,
        location,
        max_batch_size=args.max_batch_size,
        max_payload_bytes=args.max_payload_bytes,
        max_image_pixels=args.max_image_pixels,
        decode_workers=args.decode_workers,
        forward_workers=forward_workers,
        runtime=args.runtime or default_runtime(device),
        runtime_threads=torch_threads,
        max_batch_latency_ms=args.max_batch_latency_ms,
    )
    try:
        model.load()
    except (StorageError, SettingsError, FileNotFoundError, ValueError) as err:
        logger.error("Cannot load model %r from %s: %s", args.model_name, location, err)
        return 1
    logger.info(
        "%d forward pass(es) at once on %s, %d thread(s) each, %d decode thread(s)",
        model.forward_workers,
        model.bundle.runtime_name,
        torch_threads,
        model.decode_workers,
    )
    # KServe builds its REST app around this module-level FastAPI app when the server starts;
    # the last middleware added runs first: admission, then the REST front, then KServe.
    app = model_server.app
    app.add_middleware(RestFrontMiddleware, served_version=lambda: model.model_version)
    limits = AdmissionLimits(
        max_payload_bytes=args.max_payload_bytes,
        max_inflight_requests=args.max_inflight_requests or default_inflight(args, model),
        max_inflight_bytes=args.max_inflight_bytes,
        body_timeout_s=args.body_timeout_s,
    )
    rejected = REJECTED_REQUESTS.labels
    app.add_middleware(
        AdmissionMiddleware, limits=limits, on_reject=lambda why: rejected(model.name, why).inc()
    )
    logger.info("request limits: %s", limits)
    # every ModelServer option that KServe's own parser defines, as parsed
    names = inspect.signature(ModelServer).parameters
    server = ModelServer(**{name: getattr(args, name) for name in names if hasattr(args, name)})
    server.dataplane = ServingDataPlane(model_registry=server.registered_models)
    quiet_refusals(app)
    if not args.enable_model_repository_api:
        close_model_repository(server, app)
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())

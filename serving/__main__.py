"""``python -m serving``: load a model bundle and serve it with the KServe model server.

    python -m serving --model_name brain-mri --storage_uri s3://models/brain-mri/v3 \\
        [--http_port 8080] [--grpc_port 8081] [--max_batch_size 64]
    python -m serving --model_name brain-mri --model_dir /mnt/models   # KServe storage initializer

Every standard KServe model-server flag (``--workers``, ``--enable_grpc``, ...) is accepted.
``s3://`` URIs are read with the object-storage settings from the environment (``S3_ENDPOINT``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``S3_USE_HTTPS``); anything else is a local
directory such as ``/mnt/models``.
"""

from __future__ import annotations

import argparse
import sys

from kserve import ModelServer, model_server
from kserve import logging as kserve_logging
from kserve.logging import logger

from brainmri.settings import SettingsError
from brainmri.storage import StorageError
from serving.predictor import DEFAULT_MAX_BATCH_SIZE, BrainMRIModel


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
    parser = argparse.ArgumentParser(
        prog="python -m serving",
        description="Serve the brain-MRI tumour classifier (KServe v1 and v2 protocols).",
        parents=[model_server.parser],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--storage_uri",
        help="Model bundle location: s3://bucket/prefix (read with the S3_* / AWS_* settings "
        "from the environment), or a local directory holding model.json and model.pt.",
    )
    source.add_argument(
        "--model_dir",
        type=_local_path,
        help="Local directory holding the bundle, e.g. /mnt/models where KServe's storage "
        "initializer puts the model named by the InferenceService's STORAGE_URI.",
    )
    parser.add_argument(
        "--max_batch_size",
        type=_positive_int,
        default=DEFAULT_MAX_BATCH_SIZE,
        help="Most images accepted in one request; larger requests get HTTP 400.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.configure_logging:
        kserve_logging.configure_logging(args.log_config_file)
    location = args.storage_uri or args.model_dir
    model = BrainMRIModel(args.model_name, location, max_batch_size=args.max_batch_size)
    try:
        model.load()
    except (StorageError, SettingsError, FileNotFoundError, ValueError) as err:
        logger.error("Cannot load model %r from %s: %s", args.model_name, location, err)
        return 1
    ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=args.workers,
        max_threads=args.max_threads,
        max_asyncio_workers=args.max_asyncio_workers,
        enable_grpc=args.enable_grpc,
        enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging,
        access_log_format=args.access_log_format,
        event_loop=args.event_loop,
        timeout_keep_alive=args.timeout_keep_alive,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
    ).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make run``: the whole workflow on this machine, from images to an answered HTTP query.

Starts a local S3 server (unless ``S3_ENDPOINT`` points at one already), loads the demo set (or
``--data``) into a bucket, runs the real pipeline with ``kfp.local``, serves the promoted model
with the KServe model server, sends it one image and prints the answer. With ``--mlflow``
(``make run MLFLOW=1``) it also starts a local MLflow server (unless ``MLFLOW_TRACKING_URI``
names one) that the steps track the run in; ``--mlflow-ui`` (``make mlflow-ui``) serves the
tracked runs again afterwards, until interrupted.
"""

import argparse
import base64
import contextlib
import json
import os
import secrets
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import requests

from brainmri.class_folders import list_labelled_files
from brainmri.demo_data import generate_demo_dataset
from brainmri.local_mlflow import LocalMlflowServer
from brainmri.local_s3 import LocalS3Server
from brainmri.registry import read_production_record
from brainmri.storage import ObjectStore, S3Uri
from brainmri.tracking import RUN_ID_KEY, TRACKING_URI_ENV, experiment_name, tracking_uri
from components.config import (
    DEMO_THRESHOLD,
    DEMO_TRAINING,
    DEMO_VAL_FRACTION,
    PROMOTION_THRESHOLD,
    TrainConfig,
    add_flags,
    pop_flags,
    to_dict,
)
from components.report import percent
from pipelines.__main__ import run_local
from pipelines.console import quiet_console
from serving.process import serve_in_subprocess

RUN_DIR = Path(".run")
RECIPE = TrainConfig()  # the pipeline's default: what --data trains
DEMO_URI = S3Uri("demo-data", "brain-mri")
MLFLOW_ARTIFACTS = S3Uri("mlflow", "artifacts")
DEFAULT_MLFLOW_PORT = 5000


def say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


@contextlib.contextmanager
def object_storage() -> Iterator[None]:
    """Use the S3 server in ``S3_ENDPOINT`` if set, else run a local one with fresh credentials."""
    if os.environ.get("S3_ENDPOINT"):
        say(f"using object storage at {os.environ['S3_ENDPOINT']}")
        yield
        return
    if not os.environ.get("AWS_ACCESS_KEY_ID"):
        os.environ["AWS_ACCESS_KEY_ID"] = f"local{secrets.token_hex(4)}"
        os.environ["AWS_SECRET_ACCESS_KEY"] = secrets.token_hex(16)
        say("generated throw-away credentials for the local S3 server")
    server = LocalS3Server(RUN_DIR / "s3")
    say(f"starting local S3 server (SeaweedFS) on {server.endpoint}; log: {server.log_path}")
    server.start()
    os.environ["S3_ENDPOINT"] = server.endpoint
    try:
        yield
    finally:
        say("stopping local S3 server")
        server.stop()


@contextlib.contextmanager
def experiment_tracking(enabled: bool, port: int) -> Iterator[str | None]:
    """The tracking server's URI: ``MLFLOW_TRACKING_URI``'s, else a local MLflow server's
    (SQLite in .run/mlflow, artifacts in the object storage) on ``port``; None when off."""
    if not enabled:
        yield None
        return
    if tracking_uri() is not None:
        say(f"tracking the run in MLflow at {tracking_uri()}")
        yield tracking_uri()
        return
    server = LocalMlflowServer(RUN_DIR / "mlflow", MLFLOW_ARTIFACTS, port)
    say(f"starting a local MLflow server on {server.url}; log: {server.log_path}")
    server.start()
    os.environ[TRACKING_URI_ENV] = server.url
    say(f"MLflow UI: {server.url} (runs, metrics, reports and the model registry)")
    try:
        yield server.url
    finally:
        say("stopping the local MLflow server (make mlflow-ui serves it again)")
        os.environ.pop(TRACKING_URI_ENV, None)
        server.stop()


def wait_for_interrupt() -> None:
    """Sleep until Ctrl-C."""
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)


def serve_mlflow_ui(port: int, wait: Callable[[], None] = wait_for_interrupt) -> int:
    """``make mlflow-ui``: the local S3 and MLflow servers on this checkout's tracked runs,
    while ``wait`` (until Ctrl-C)."""
    if not (RUN_DIR / "mlflow" / "mlflow.db").is_file():
        print(f"nothing tracked yet in {RUN_DIR / 'mlflow'}: run `make run MLFLOW=1` first")
        return 1
    with object_storage(), experiment_tracking(True, port):
        print("press Ctrl-C to stop", flush=True)
        wait()
    return 0


def prepare_source(data: str | None, store: ObjectStore) -> str:
    """The pipeline's source: ``data``, or the generated demo set uploaded to the bucket."""
    if data:
        return data
    demo = RUN_DIR / "demo"
    say(f"generating the synthetic demo set in {demo}")
    generate_demo_dataset(demo, per_class=60, size=128, seed=0)
    say(f"uploading it to {DEMO_URI}")
    store.upload_dir(demo, DEMO_URI)
    return str(DEMO_URI)


def query_image(source: str, store: ObjectStore) -> tuple[str, bytes]:
    """One image of ``source`` to ask about, with its true class."""
    first = next(f for f in list_labelled_files(source, store) if f.label is not None)
    return first.label, first.read()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default=os.environ.get("DATA") or None,
        help="a class-per-folder tree: local folder or s3://bucket/prefix, trained with the "
        f"pipeline's real-data recipe ({RECIPE.backbone}, {RECIPE.image_size} px, "
        f"{RECIPE.epochs} epochs: ~12 min on 2 CPU cores) (default: the generated demo set, a "
        "small CNN trained in seconds)",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        help=f"test accuracy needed to promote (default: {PROMOTION_THRESHOLD} with --data, the "
        f"pipeline's, set from the measured recipe; {DEMO_THRESHOLD} on the demo set)",
    )
    parser.add_argument(
        "--mlflow",
        action="store_true",
        default=os.environ.get("MLFLOW", "") not in ("", "0"),
        help=f"track the run in MLflow: {TRACKING_URI_ENV}'s server, else a local one "
        "(default: on when MLFLOW is set, as in `make run MLFLOW=1`)",
    )
    parser.add_argument(
        "--mlflow-port",
        type=int,
        default=int(os.environ.get("MLFLOW_PORT") or DEFAULT_MLFLOW_PORT),
        help=f"port of the local MLflow server and its UI (default: {DEFAULT_MLFLOW_PORT})",
    )
    parser.add_argument(
        "--mlflow-ui",
        action="store_true",
        help="only serve the local MLflow UI on the runs tracked so far, until Ctrl-C",
    )
    parser.add_argument("--model-name", default="brain-mri-classifier")
    parser.add_argument("--models-bucket", default="models")
    add_flags(
        parser,
        TrainConfig(),
        "training (defaults shown: the real-data recipe, used with --data; the demo set "
        f"trains {DEMO_TRAINING.backbone} at {DEMO_TRAINING.image_size} px for "
        f"{DEMO_TRAINING.epochs} epochs)",
    )
    return parser.parse_args(argv)


def training_config(args: argparse.Namespace) -> TrainConfig:
    """What to train: the demo's small CNN unless ``--data`` names real scans (then the
    pipeline's default, the real-data recipe); training flags override either."""
    return pop_flags(dict(vars(args)), TrainConfig() if args.data else DEMO_TRAINING)


def promotion_threshold(args: argparse.Namespace) -> float:
    """The gate's threshold: the flag's, else the pipeline's (real scans) or the demo's."""
    if args.threshold is not None:
        return args.threshold
    return PROMOTION_THRESHOLD if args.data else DEMO_THRESHOLD


def step_outputs(run: Path, step: str) -> dict[str, dict]:
    """A kfp.local step's output artifacts' metadata by name (its executor_output.json)."""
    path = run / step / "executor_output.json"
    if not path.is_file():
        return {}
    artifacts = json.loads(path.read_text()).get("artifacts", {})
    return {name: a["artifacts"][0].get("metadata", {}) for name, a in artifacts.items()}


def _ingested(out: dict[str, dict]) -> str:
    data = out.get("dataset", {})
    return (
        f"{data.get('num_images', '?')} images, {data.get('duplicates', '?')} duplicates "
        f"collapsed, {data.get('quarantined', '?')} quarantined"
    )


def _split(out: dict[str, dict]) -> str:
    sizes = out.get("split_metrics", {})
    return "train {} / val {} / test {}, {} leaked".format(
        *(int(sizes.get(k, 0)) for k in ("train_images", "val_images", "test_images")),
        int(sizes.get("leaked_images", 0)),
    )


def _trained(out: dict[str, dict]) -> str:
    metrics = out.get("training_metrics", {})
    return (
        f"best val accuracy {percent(metrics.get('best_val_accuracy'))} at epoch "
        f"{metrics.get('best_epoch', '?')} of {metrics.get('epochs_run', '?')}"
    )


def _evaluated(out: dict[str, dict]) -> str:
    scores = out.get("metrics", {})
    low, high = (100 * scores.get(f"accuracy_ci_{end}", float("nan")) for end in ("low", "high"))
    return (
        f"accuracy {percent(scores.get('accuracy'))} [{low:.1f}, {high:.1f}] (95 %), "
        f"{scores.get('errors', float('nan')):.0f} errors of {scores.get('test_images', 0):.0f}"
    )


def _gated(out: dict[str, dict]) -> str:
    gate = out.get("gate_metrics", {})
    champion = gate.get("champion_accuracy")
    versus = f"champion {100 * champion:.2f} %" if champion is not None else "no champion"
    decision = "PROMOTE" if gate.get("promote") else "KEEP production"
    return (
        f"{decision}: challenger {percent(gate.get('challenger_accuracy'))} vs {versus} "
        f"(threshold {percent(gate.get('threshold'))})"
    )


def _promoted(out: dict[str, dict]) -> str:
    isvc = out.get("isvc_manifest", {})
    registered = f" (MLflow: {isvc['mlflow']})" if isvc.get("mlflow") else ""
    return f"{isvc.get('version') or 'nothing'}{registered}"


def tracked_run_line(run: Path, uri: str | None, experiment: str) -> list[str]:
    """Where the MLflow run of ``run`` is, when the run was tracked."""
    run_id = step_outputs(run, "train").get("model", {}).get(RUN_ID_KEY)
    if uri is None or not run_id:
        return []
    return [f"{'mlflow:':<10}run {run_id} in experiment {experiment_name(experiment)} at {uri}"]


# what each step's console line and the final summary say of its outputs
STEP_SUMMARIES = {
    "ingest": _ingested,
    "split": _split,
    "train": _trained,
    "evaluate": _evaluated,
    "gate": _gated,
    "promote": _promoted,
}
SUMMARY_LINES = {"data": "ingest", "test": "evaluate", "gate": "gate", "promoted": "promote"}


def latest_run(root: Path) -> Path | None:
    """The newest kfp.local run folder under the pipeline root."""
    runs = [path for path in root.glob("*") if path.is_dir()] if root.is_dir() else []
    return max(runs, key=lambda path: path.stat().st_mtime) if runs else None


def step_summary(root: Path, step: str) -> str:
    """The key output of ``step`` in the newest run (its console line's tail)."""
    run = latest_run(root)
    summarise = STEP_SUMMARIES.get(step)
    return summarise(step_outputs(run, step)) if run is not None and summarise else ""


def run_summary(run: Path, answer: dict | None) -> list[str]:
    """Five lines: the data, the test accuracy, the gate's decision, the promotion, the answer."""
    lines = [
        f"{f'{name}:':<10}{STEP_SUMMARIES[step](step_outputs(run, step))}"
        for name, step in SUMMARY_LINES.items()
    ]
    if answer:
        first = answer["predictions"][0]
        confidence = first.get("confidence")
        said = f"{confidence:.3f}" if confidence is not None else "none"
        lines.append(
            f"answer:   {first['label']} (confidence {said}, uncertain {first['uncertain']})"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mlflow_ui:
        return serve_mlflow_ui(args.mlflow_port)
    args.threshold = promotion_threshold(args)
    RUN_DIR.mkdir(exist_ok=True)
    started = time.monotonic()
    with object_storage(), experiment_tracking(args.mlflow, args.mlflow_port) as tracking:
        store = ObjectStore()
        source = prepare_source(args.data, store)
        before = read_production_record(store, args.models_bucket, args.model_name)
        say(f"running the pipeline with kfp.local on {source}")
        arguments = {
            "source": source,
            "threshold": args.threshold,
            "model_name": args.model_name,
            "models_bucket": args.models_bucket,
            "train": to_dict(training_config(args)),
            **({} if args.data else {"val_fraction": DEMO_VAL_FRACTION}),
        }
        root = RUN_DIR / "pipeline-root"
        if os.environ.get("VERBOSE", "") not in ("", "0"):
            run_local(arguments, root)  # every step's full output, as kfp.local prints it
        else:
            logs = RUN_DIR / "logs"
            say(f"each step's full log: {logs}/<step>.log (VERBOSE=1 prints them here)")
            with (
                quiet_console(sys.stdout, logs, partial(step_summary, root)),
                warnings.catch_warnings(),
            ):
                # kfp.local's warning, once per step, that the image is not what runs here
                warnings.filterwarnings("ignore", "You may be attemping", RuntimeWarning)
                run_local(arguments, root)
        record = read_production_record(store, args.models_bucket, args.model_name)
        run = latest_run(root)
        page = run / "evaluate" / "html_report" if run is not None else None
        page = page if page is not None and page.is_file() else None
        if page is not None:
            say(f"evaluation report: {page} ({page.resolve().as_uri()})")
        tracked = tracked_run_line(run, tracking, args.model_name) if run is not None else []
        if record is None or record == before:
            if run is not None:
                print("\n".join(run_summary(run, None) + tracked))
            say(
                f"the gate kept production as it was (threshold {args.threshold}); see the "
                "gate step's log above. Nothing new to serve."
            )
            return 1
        say(
            f"promoted version {record['version']} (test accuracy {record['accuracy']:.3f}) "
            f"to {record['storage_uri']}"
        )
        truth, image = query_image(source, store)
        serving_args = ["--model-name", args.model_name, "--storage-uri", record["storage_uri"]]
        say(f"starting the KServe model server: python -m serving {' '.join(serving_args)}")
        with serve_in_subprocess(serving_args, RUN_DIR / "serving.log") as server:
            url = server.url
            body = {"instances": [{"image_bytes": {"b64": base64.b64encode(image).decode()}}]}
            say(f"POST {url}/v1/models/{args.model_name}:predict (an image of class '{truth}')")
            answer = requests.post(
                f"{url}/v1/models/{args.model_name}:predict", json=body, timeout=30
            )
            answer.raise_for_status()
            print(json.dumps(answer.json(), indent=2))
    say(f"done in {time.monotonic() - started:.0f} s")
    if run is not None:
        print("\n".join(run_summary(run, answer.json()) + tracked))
    if page is not None:
        print(f"report:   {page.resolve().as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

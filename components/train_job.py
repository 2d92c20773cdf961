"""Multi-node training as a Kubeflow PyTorchJob (``kubeflow.org/v1``).

When the pipeline's ``workers`` parameter is above 1, the train step stages its inputs in object
storage, creates a PyTorchJob of ``workers`` replicas (one Master, the rest Workers) that each
run ``python -m components.train_job`` under DDP, waits for it, and fetches the model that rank 0
uploaded. The same entry point runs here under ``torchrun`` for tests.
"""

import argparse
import copy
import json
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from brainmri.model import METADATA_FILE
from brainmri.storage import ObjectStore, S3Uri, is_s3_uri
from components.augment import AugmentConfig
from components.distributed import DistributedContext
from components.train import TrainConfig, train_model

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
CONTAINER_NAME = "pytorch"  # the operator requires this container name
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


class TrainingJobError(RuntimeError):
    """The PyTorchJob failed, timed out or could not be created; the message says which."""


@dataclass(frozen=True)
class TrainingJobSpec:
    """What the PyTorchJob runs and where."""

    name: str
    namespace: str
    image: str
    workers: int
    args: list[str]
    gpus_per_worker: int = 0
    cpu: str = "2"
    memory: str = "8Gi"
    s3_endpoint: str = "minio.brain-mri.svc.cluster.local:9000"
    s3_secret: str = "minio-credentials"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, str]] = field(default_factory=list)


def render_pytorch_job(spec: TrainingJobSpec) -> dict[str, Any]:
    """The PyTorchJob manifest: one Master and ``workers - 1`` Workers, same pod template."""
    if spec.workers < 2:
        raise ValueError(f"workers={spec.workers}: a PyTorchJob needs at least 2 replicas")
    limits = {"cpu": spec.cpu, "memory": spec.memory}
    if spec.gpus_per_worker:
        limits["nvidia.com/gpu"] = str(spec.gpus_per_worker)
    env = [{"name": "S3_ENDPOINT", "value": spec.s3_endpoint}] + [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": spec.s3_secret, "key": key}}}
        for key in S3_ENV
    ]
    pod_spec: dict[str, Any] = {
        "containers": [
            {
                "name": CONTAINER_NAME,
                "image": spec.image,
                "command": ["python", "-m", "components.train_job"],
                "args": spec.args,
                "env": env,
                "resources": {"requests": dict(limits), "limits": limits},
            }
        ],
    }
    if spec.node_selector:
        pod_spec["nodeSelector"] = spec.node_selector
    if spec.tolerations:
        pod_spec["tolerations"] = spec.tolerations

    def replica(count: int) -> dict[str, Any]:
        return {
            "replicas": count,
            "restartPolicy": "OnFailure",
            "template": {"spec": copy.deepcopy(pod_spec)},
        }

    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": spec.name, "namespace": spec.namespace},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 2},
            "pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(spec.workers - 1)},
        },
    }


def job_state(job: dict[str, Any]) -> tuple[str | None, str]:
    """``("Succeeded" | "Failed" | None, message)`` from the job's status conditions."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Succeeded", "Failed") and condition.get("status") == "True":
            return condition["type"], condition.get("message", "")
    return None, ""


def run_pytorch_job(
    manifest: dict[str, Any],
    api_client: client.ApiClient,
    timeout_s: float = 6 * 3600,
    poll_s: float = 10.0,
) -> str:
    """Create the job and wait until it succeeds; raise :class:`TrainingJobError` otherwise."""
    api = client.CustomObjectsApi(api_client)
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    where = f"PyTorchJob {namespace}/{name}"
    try:
        api.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, manifest, _request_timeout=(5, 30)
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = api.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _request_timeout=(5, 30)
            )
            state, message = job_state(job)
            if state == "Succeeded":
                return message or "succeeded"
            if state == "Failed":
                raise TrainingJobError(
                    f"{where} failed: {message or 'no message'}; see "
                    f"`kubectl -n {namespace} logs -l "
                    f"training.kubeflow.org/job-name={name}`"
                )
            time.sleep(poll_s)
    except ApiException as err:
        raise TrainingJobError(
            f"{where}: Kubernetes API answered {err.status} {err.reason}; "
            "is the Kubeflow training operator installed and may the "
            "pipeline's ServiceAccount create pytorchjobs?"
        ) from err
    raise TrainingJobError(f"{where} did not finish within {timeout_s:.0f} s")


def _fetch(location: str, local: Path, store: ObjectStore | None) -> Path:
    """A local path for ``location`` (downloading an ``s3://`` folder or file)."""
    if not is_s3_uri(location):
        return Path(location)
    store = store or ObjectStore()
    uri = S3Uri.parse(location)
    if store.exists(uri):
        return store.download_file(uri, local)
    store.download_dir(uri, local, progress=False)
    return local


def run_replica(
    dataset: str,
    split_csv: str,
    augment: str,
    output: str,
    config: TrainConfig,
    store: ObjectStore | None = None,
) -> None:
    """One replica: fetch inputs, train under DDP, and (rank 0) publish the model."""
    ctx = DistributedContext.from_env()
    with tempfile.TemporaryDirectory(prefix=f"rank{ctx.rank}-") as work:
        work_dir = Path(work)
        dataset_dir = _fetch(dataset, work_dir / "dataset", store)
        split_path = _fetch(split_csv, work_dir / "split.csv", store)
        augment_path = _fetch(augment, work_dir / "augment.json", store)
        model_dir = work_dir / "model" if is_s3_uri(output) else Path(output)
        train_model(
            dataset_dir,
            split_path,
            model_dir,
            config,
            AugmentConfig.load(augment_path),
            progress=ctx.is_main,
        )
        if ctx.is_main and is_s3_uri(output):
            (store or ObjectStore()).upload_dir(model_dir, S3Uri.parse(output), progress=False)


def launch_distributed_training(
    dataset_dir: Path,
    split_csv: Path,
    augment_json: Path,
    model_dir: Path,
    config: TrainConfig,
    job: TrainingJobSpec,
    staging: S3Uri,
    api_client: client.ApiClient,
    store: ObjectStore | None = None,
    timeout_s: float = 6 * 3600,
    poll_s: float = 10.0,
) -> dict[str, Any]:
    """Stage the inputs under ``staging``, run the PyTorchJob, fetch the model into ``model_dir``.

    ``job.args`` is filled in here; returns the rendered manifest (for the step's artifacts).
    """
    store = store or ObjectStore()
    store.upload_dir(dataset_dir, staging.child("dataset"), progress=False)
    store.upload_file(split_csv, staging.child("split.csv"))
    store.upload_file(augment_json, staging.child("augment.json"))
    args = [
        "--dataset",
        str(staging.child("dataset")),
        "--split",
        str(staging.child("split.csv")),
        "--augment",
        str(staging.child("augment.json")),
        "--output",
        str(staging.child("model")),
        "--config",
        json.dumps(asdict(config)),
    ]
    manifest = render_pytorch_job(replace(job, args=args))
    print(f"running PyTorchJob {job.namespace}/{job.name} with {job.workers} replicas")
    run_pytorch_job(manifest, api_client, timeout_s, poll_s)
    store.download_dir(staging.child("model"), model_dir, progress=False)
    return manifest


def run_training(
    dataset_dir: Path,
    split_csv: Path,
    augment_json: Path,
    model_dir: Path,
    config: TrainConfig,
    *,
    checkpoint_uri: str | None = None,
    workers: int = 1,
    namespace: str = "brain-mri",
    run_id: str = "local",
    models_bucket: str = "models",
) -> dict[str, Any]:
    """The train step: in this process (``workers <= 1``) or as a PyTorchJob of ``workers``
    replicas. Returns the saved bundle's metadata."""
    if workers <= 1:
        train_model(
            dataset_dir,
            split_csv,
            model_dir,
            config,
            AugmentConfig.load(augment_json),
            checkpoint_uri=checkpoint_uri,
        )
    else:
        from brainmri.inference_service import cluster_api_client
        from components import COMPONENT_IMAGE

        api_client = cluster_api_client()
        if api_client is None:
            raise TrainingJobError(
                f"workers={workers} runs a PyTorchJob, which needs a "
                "Kubernetes cluster; no cluster is configured here (use "
                "workers=1 to train in this process)"
            )
        job = TrainingJobSpec(
            name=f"brain-mri-train-{run_id}"[:63].rstrip("-").lower(),
            namespace=namespace,
            image=COMPONENT_IMAGE,
            workers=workers,
            args=[],
            gpus_per_worker=1 if torch.cuda.is_available() else 0,
        )
        launch_distributed_training(
            dataset_dir,
            split_csv,
            augment_json,
            model_dir,
            config,
            job,
            S3Uri(models_bucket, f"staging/{run_id}"),
            api_client,
        )
    return json.loads((Path(model_dir) / METADATA_FILE).read_text())["metadata"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One replica of a distributed training job.")
    parser.add_argument("--dataset", required=True, help="dataset folder or s3:// prefix")
    parser.add_argument("--split", required=True, help="split manifest CSV (path or s3://)")
    parser.add_argument("--augment", required=True, help="augment config JSON (path or s3://)")
    parser.add_argument("--output", required=True, help="where rank 0 writes the model")
    parser.add_argument("--config", default="{}", help="TrainConfig fields as JSON")
    args = parser.parse_args(argv)
    run_replica(
        args.dataset, args.split, args.augment, args.output, TrainConfig(**json.loads(args.config))
    )


if __name__ == "__main__":
    main()

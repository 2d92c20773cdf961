"""Multi-node training as a Kubeflow PyTorchJob (``kubeflow.org/v1``).

When the pipeline's ``workers`` parameter is above 1, the train step stages its inputs in object
storage, creates a PyTorchJob of ``workers`` replicas (one Master, the rest Workers) that each
run ``python -m components.train_job --train-run <TrainRun as JSON>`` under DDP, waits for it,
and fetches the model that rank 0 published. The same entry point runs here under
``torchrun`` for tests.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from kubernetes import client

from brainmri.cpu import cpu_budget, loaded_allocator
from brainmri.kube import (
    PENDING,
    TIMEOUT,
    AlreadyExists,
    CustomResource,
    Progress,
    cluster_api_client,
    poll,
)
from brainmri.model import ModelBundle
from brainmri.pod_security import (
    MINIO_CLIENT_LABEL,
    container_security_context,
    pod_security_context,
    tmp_mount,
    tmp_volume,
)
from brainmri.storage import ObjectStore, S3Uri, fetch, is_s3_uri, publish
from components.distributed import DistributedContext
from components.train import TrainResult, TrainRun, train_model

PYTORCH_JOBS = CustomResource(
    "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob", "the Kubeflow training operator"
)
CONTAINER_NAME = "pytorch"  # the operator requires this container name
SHM_VOLUME = "dshm"
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
DEFAULT_JOB_TIMEOUT_S = 6 * 3600.0


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
    scratch: str = "8Gi"  # the /tmp emptyDir: the dataset's copy, the bundle
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
        "securityContext": pod_security_context(),
        "containers": [
            {
                "name": CONTAINER_NAME,
                "image": spec.image,
                "command": ["python", "-m", "components.train_job"],
                "args": spec.args,
                "env": env,
                "resources": {"requests": dict(limits), "limits": limits},
                "securityContext": container_security_context(),
                # /tmp: the dataset's local copy and the bundle; /dev/shm: data-loader workers
                "volumeMounts": [tmp_mount(), {"name": SHM_VOLUME, "mountPath": "/dev/shm"}],
            }
        ],
        "volumes": [
            tmp_volume(spec.scratch),
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}},
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
            "template": {
                "metadata": {"labels": {MINIO_CLIENT_LABEL: "true"}},
                "spec": copy.deepcopy(pod_spec),
            },
        }

    return {
        "apiVersion": PYTORCH_JOBS.api_version,
        "kind": PYTORCH_JOBS.kind,
        "metadata": {"name": spec.name, "namespace": spec.namespace},
        "spec": {
            "runPolicy": {"cleanPodPolicy": "None", "backoffLimit": 2},
            "pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(spec.workers - 1)},
        },
    }


def job_state(job: dict[str, Any]) -> Progress:
    """``Succeeded``, ``Failed`` or pending, with the operator's message, from the job's status
    conditions."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") in ("Succeeded", "Failed") and condition.get("status") == "True":
            return Progress(condition["type"], condition.get("message", ""))
    return Progress(PENDING, "")


def create_or_adopt(manifest: dict[str, Any], api_client: client.ApiClient) -> dict[str, Any]:
    """Create the job; when one of that name exists (a retried task), adopt it while it runs or
    has succeeded, and start a fresh one (``-r2``, ``-r3``, ...) when it failed. Returns the
    manifest of the job to wait for."""
    meta = manifest["metadata"]
    for attempt in range(1, 10):
        name = meta["name"] if attempt == 1 else f"{meta['name'][:59]}-r{attempt}"
        candidate = {**manifest, "metadata": {**meta, "name": name}}
        try:
            PYTORCH_JOBS.create(api_client, candidate)
            return candidate
        except AlreadyExists:
            existing = PYTORCH_JOBS.get(api_client, meta["namespace"], name)
            if existing is not None and job_state(existing).state != "Failed":
                print(f"adopting {PYTORCH_JOBS.describe(meta['namespace'], name)} (a retry)")
                return candidate
    raise TrainingJobError(f"PyTorchJob {meta['name']} failed 9 times; delete the old ones")


def run_pytorch_job(
    manifest: dict[str, Any],
    api_client: client.ApiClient,
    timeout_s: float = DEFAULT_JOB_TIMEOUT_S,
    poll_s: float = 10.0,
) -> str:
    """Create (or adopt) the job and wait until it succeeds; raise :class:`TrainingJobError`
    otherwise. An API error while waiting does not end the wait (:func:`brainmri.kube.poll`)."""
    manifest = create_or_adopt(manifest, api_client)
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    where = PYTORCH_JOBS.describe(namespace, name)

    def look() -> Progress:
        job = PYTORCH_JOBS.get(api_client, namespace, name)
        return job_state(job) if job is not None else Progress("Failed", "the job was deleted")

    outcome = poll(look, timeout_s=timeout_s, interval_s=poll_s)
    if outcome.state == "Succeeded":
        return outcome.detail or "succeeded"
    if outcome.state == TIMEOUT:
        raise TrainingJobError(f"{where} did not finish within {timeout_s:.0f} s")
    raise TrainingJobError(
        f"{where} failed: {outcome.detail or 'no message'}; see "
        f"`kubectl -n {namespace} logs -l training.kubeflow.org/job-name={name}`"
    )


def run_replica(run: TrainRun, store: ObjectStore | None = None) -> None:
    """One replica: fetch the inputs, train under DDP, and (rank 0) publish the model."""
    ctx = DistributedContext.from_env()
    runtime = f"{cpu_budget()} CPUs, malloc {loaded_allocator()}"
    print(f"replica {ctx.rank} of {ctx.world_size}: {runtime}", flush=True)
    with tempfile.TemporaryDirectory(prefix=f"rank{ctx.rank}-") as work:
        work_dir = Path(work)
        local = run.at(
            dataset=str(fetch(run.dataset, work_dir / "dataset", store)),
            split_csv=str(fetch(run.split_csv, work_dir / "split.csv", store)),
            output=str(work_dir / "model") if is_s3_uri(run.output) else run.output,
        )
        train_model(local, progress=ctx.is_main)
        if ctx.is_main and local.output != run.output:
            publish(Path(local.output), run.output, store)


def launch_distributed_training(
    run: TrainRun,
    job: TrainingJobSpec,
    staging: S3Uri,
    api_client: client.ApiClient,
    store: ObjectStore | None = None,
    timeout_s: float = DEFAULT_JOB_TIMEOUT_S,
    poll_s: float = 10.0,
) -> dict[str, Any]:
    """Stage ``run``'s inputs under ``staging``, run the PyTorchJob, fetch the model into
    ``run.output``. ``job.args`` is filled in here; returns the rendered manifest (for the
    step's artifacts)."""
    store = store or ObjectStore()
    staged = run.at(
        dataset=str(staging.child("dataset")),
        split_csv=str(staging.child("split.csv")),
        output=str(staging.child("model")),
    )
    publish(Path(run.dataset), staged.dataset, store)
    publish(Path(run.split_csv), staged.split_csv, store)
    manifest = render_pytorch_job(replace(job, args=["--train-run", staged.to_json()]))
    print(f"running PyTorchJob {job.namespace}/{job.name} with {job.workers} replicas")
    run_pytorch_job(manifest, api_client, timeout_s, poll_s)
    fetch(staged.output, Path(run.output), store)
    return manifest


@dataclass(frozen=True)
class Replicas:
    """Where the train step trains: ``workers`` replicas (1: this process; more: a PyTorchJob in
    ``namespace``, its inputs staged under ``s3://<models_bucket>/staging/<run_id>``)."""

    workers: int = 1
    namespace: str = "brain-mri"
    run_id: str = "local"
    models_bucket: str = "models"


def run_training(
    run: TrainRun,
    replicas: Replicas | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """The train step: ``run`` in this process, or on a PyTorchJob of ``replicas``;
    ``on_epoch`` sees each epoch's row as it is done in this process (a PyTorchJob's rows are in
    the result's history)."""
    replicas = replicas or Replicas()
    workers, run_id = replicas.workers, replicas.run_id
    if workers <= 1:
        return train_model(run, on_epoch=on_epoch)
    from components import COMPONENT_IMAGE

    api_client = cluster_api_client()
    if api_client is None:
        raise TrainingJobError(
            f"workers={workers} runs a PyTorchJob, which needs a Kubernetes cluster; no cluster "
            "is configured here (use workers=1 to train in this process)"
        )
    job = TrainingJobSpec(
        name=f"brain-mri-train-{run_id}"[:63].rstrip("-").lower(),
        namespace=replicas.namespace,
        image=COMPONENT_IMAGE,
        workers=workers,
        args=[],
        gpus_per_worker=1 if torch.cuda.is_available() else 0,
    )
    staging = S3Uri(replicas.models_bucket, f"staging/{run_id}")
    launch_distributed_training(run, job, staging, api_client)
    return TrainResult.from_metadata(ModelBundle.read_metadata(Path(run.output)))


def example_manifest() -> str:
    """The PyTorchJob the train step creates for ``workers=2`` with the default recipe (staging
    paths of run ``<run-id>``), as shipped in ``manifests/training/pytorchjob.yaml``."""
    from components import COMPONENT_IMAGE

    staging = S3Uri("models", "staging/<run-id>")
    run = TrainRun(
        str(staging.child("dataset")), str(staging.child("split.csv")), str(staging.child("model"))
    )
    job = TrainingJobSpec(
        "brain-mri-train-<run-id>", "brain-mri", COMPONENT_IMAGE, 2, ["--train-run", run.to_json()]
    )
    header = (
        "# The PyTorchJob the train step creates when workers=2 (see components/train_job.py)\n"
    )
    return header + yaml.safe_dump(render_pytorch_job(job), sort_keys=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One replica of a distributed training job.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--train-run", help="the TrainRun as JSON (locations may be s3:// URIs)")
    what.add_argument(
        "--example", action="store_true", help="print the example manifest (make compile)"
    )
    args = parser.parse_args(argv)
    if args.example:
        print(example_manifest(), end="")
        return
    run_replica(TrainRun.from_json(args.train_run))


if __name__ == "__main__":
    main()

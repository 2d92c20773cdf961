"""Distributed training: the PyTorchJob manifest, its lifecycle on kmock, and a real 2-process
gloo DDP run launched exactly as the manifest says."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import kmock
import pytest

from brainmri.dataset import read_manifest
from brainmri.kube import PENDING, Progress
from brainmri.local_servers import free_ports
from brainmri.model import ModelBundle
from brainmri.storage import ObjectStore, S3Uri
from components.config import AugmentConfig, TrainConfig
from components.train import TrainRun
from components.train_job import (
    PYTORCH_JOBS,
    TrainingJobError,
    TrainingJobSpec,
    example_manifest,
    job_state,
    launch_distributed_training,
    render_pytorch_job,
    run_pytorch_job,
)
from tests.kube_emulator import KubeApi

KIND = PYTORCH_JOBS.kind
RESOURCE = f"{PYTORCH_JOBS.api_version}/{PYTORCH_JOBS.plural}"
NAMESPACE = "brain-mri"


def job_spec(**overrides: Any) -> TrainingJobSpec:
    values = {
        "name": "train-1",
        "namespace": NAMESPACE,
        "image": "components:test",
        "workers": 2,
        "args": ["--dataset", "s3://b/d"],
    }
    return TrainingJobSpec(**{**values, **overrides})


def test_manifest_has_a_master_and_workers_with_s3_credentials_from_the_secret() -> None:
    manifest = render_pytorch_job(
        job_spec(workers=4, gpus_per_worker=1, node_selector={"gpu": "yes"})
    )
    assert manifest["kind"] == KIND and manifest["apiVersion"] == "kubeflow.org/v1"
    replicas = manifest["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    pod = replicas["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch"
    assert container["command"] == ["python", "-m", "components.train_job"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    refs = {
        e["name"]: e.get("valueFrom", {}).get("secretKeyRef", {}).get("name")
        for e in container["env"]
    }
    assert refs["AWS_ACCESS_KEY_ID"] == refs["AWS_SECRET_ACCESS_KEY"] == "minio-credentials"
    assert pod["nodeSelector"] == {"gpu": "yes"}
    with pytest.raises(ValueError, match="at least 2 replicas"):
        render_pytorch_job(job_spec(workers=1))


def test_job_state_reads_the_operator_conditions() -> None:
    running = {"status": {"conditions": [{"type": "Running", "status": "True"}]}}
    done = {
        "status": {
            "conditions": [
                {"type": "Running", "status": "False"},
                {"type": "Succeeded", "status": "True", "message": "ok"},
            ]
        }
    }
    assert job_state({}) == Progress(PENDING, "")
    assert job_state(running) == Progress(PENDING, "")
    assert job_state(done) == Progress("Succeeded", "ok")


def register_pytorchjobs(kube_api: KubeApi) -> None:
    kube_api.call(
        lambda: kube_api.emulator.resources.__setitem__(
            RESOURCE,
            kmock.ResourceInfo(
                kind=KIND,
                singular="pytorchjob",
                namespaced=True,
                verbs={"get", "list", "watch", "create", "patch", "delete"},
                subresources={"status"},
            ),
        )
    )


def stored_job(kube_api: KubeApi, name: str) -> dict | None:
    def read() -> dict | None:
        try:
            return dict(kube_api.emulator.objects[RESOURCE, NAMESPACE, name].raw)
        except KeyError:
            return None

    return kube_api.call(read)


def act_as_operator(kube_api: KubeApi, name: str, run: Any) -> threading.Thread:
    """A thread that waits for the job, runs ``run(manifest) -> (state, message)``, and
    writes the outcome into the job's status as the training operator would."""

    def operate() -> None:
        deadline = time.monotonic() + 60
        while (manifest := stored_job(kube_api, name)) is None:
            assert time.monotonic() < deadline, "the job was never created"
            time.sleep(0.1)
        state, message = run(manifest)
        status = {"conditions": [{"type": state, "status": "True", "message": message}]}
        obj = kube_api.emulator.objects[RESOURCE, NAMESPACE, name]
        kube_api.call(lambda: obj.patch({"status": status}))

    thread = threading.Thread(target=operate, daemon=True)
    thread.start()
    return thread


def test_a_failed_job_fails_the_step_with_its_message(kube_api: KubeApi) -> None:
    register_pytorchjobs(kube_api)
    thread = act_as_operator(kube_api, "train-1", lambda m: ("Failed", "OOMKilled"))
    with pytest.raises(TrainingJobError, match="failed: OOMKilled"):
        run_pytorch_job(render_pytorch_job(job_spec()), kube_api.api_client(), 30, 0.1)
    thread.join(10)


def test_a_job_that_never_finishes_times_out(kube_api: KubeApi) -> None:
    register_pytorchjobs(kube_api)
    with pytest.raises(TrainingJobError, match="did not finish within 1 s"):
        run_pytorch_job(render_pytorch_job(job_spec()), kube_api.api_client(), 1, 0.1)


def torchrun_replicas(manifest: dict, s3_env: dict[str, str]) -> tuple[str, str]:
    """Run the job's container command as 2 gloo processes on this machine (like 2 pods)."""
    container = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][
        0
    ]
    assert container["command"][:2] == ["python", "-m"]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_ports(1)[0]}",
        "-m",
        container["command"][2],
        *container["args"],
    ]
    env = {**os.environ, **s3_env, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        return "Failed", done.stderr[-2000:]
    return "Succeeded", "2 replicas finished"


def test_two_process_gloo_training_through_the_job(
    prepared: tuple[Path, Path],
    kube_api: KubeApi,
    store: ObjectStore,
    bucket: str,
    s3_env: dict[str, str],
    tmp_path: Path,
) -> None:
    register_pytorchjobs(kube_api)
    dataset, split_csv = prepared
    thread = act_as_operator(kube_api, "train-ddp", lambda m: torchrun_replicas(m, s3_env))
    config = TrainConfig(backbone="tiny_cnn", epochs=2, image_size=32, batch_size=8, cpu_threads=1)
    manifest = launch_distributed_training(
        TrainRun(dataset, split_csv, tmp_path / "model", config, AugmentConfig()),
        job_spec(name="train-ddp", workers=2),
        S3Uri(bucket, "staging/run-1"),
        kube_api.api_client(),
        store,
        timeout_s=300,
        poll_s=0.2,
    )
    thread.join(10)
    args = manifest["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0][
        "args"
    ]
    assert json.loads(args[args.index("--train-run") + 1])["train"]["epochs"] == 2
    bundle = ModelBundle.load(tmp_path / "model")
    assert bundle.metadata["world_size"] == 2
    assert [h["epoch"] for h in bundle.metadata["history"]] == [1, 2]
    # each rank trained on its half of the train split; the logged count sums both ranks
    train_rows = read_manifest(split_csv).pipe(lambda f: f[f["split"] == "train"])
    assert bundle.metadata["history"][0]["train_images"] > len(train_rows) / 2


SHIPPED_JOB = Path(__file__).resolve().parents[1] / "manifests" / "training" / "pytorchjob.yaml"


def test_shipped_job_manifest_is_what_the_step_creates() -> None:
    assert SHIPPED_JOB.read_text() == example_manifest(), (
        "manifests/training/pytorchjob.yaml is stale: run `make compile`"
    )


def test_a_retried_task_adopts_its_running_job_and_replaces_a_failed_one(
    kube_api: KubeApi,
) -> None:
    register_pytorchjobs(kube_api)
    manifest = render_pytorch_job(job_spec(name="train-retry"))
    api_client = kube_api.api_client()
    PYTORCH_JOBS.create(api_client, manifest)  # the first attempt's job, still running
    thread = act_as_operator(kube_api, "train-retry", lambda m: ("Succeeded", "done"))
    assert run_pytorch_job(manifest, api_client, 30, 0.05) == "done"  # adopted, no 409
    thread.join(10)

    failed = render_pytorch_job(job_spec(name="train-failed"))
    PYTORCH_JOBS.create(api_client, failed)
    status = {"conditions": [{"type": "Failed", "status": "True", "message": "OOMKilled"}]}
    kube_api.call(
        lambda: kube_api.emulator.objects[RESOURCE, NAMESPACE, "train-failed"].patch(
            {"status": status}
        )
    )
    thread = act_as_operator(kube_api, "train-failed-r2", lambda m: ("Succeeded", "second"))
    assert run_pytorch_job(failed, api_client, 30, 0.05) == "second"  # a fresh job, -r2
    thread.join(10)


def test_polling_survives_a_transient_api_error(kube_api: KubeApi) -> None:
    register_pytorchjobs(kube_api)
    manifest = render_pytorch_job(job_spec(name="train-flaky"))
    error = kmock.KubernetesError(status=503, reason="ServiceUnavailable", message="etcd")
    failed: list[int] = []

    def first_two(_request: object) -> bool:  # the first two reads of the job fail
        failed.append(1)
        return len(failed) <= 2

    kube_api.call(lambda: kube_api.emulator[kmock.action.FETCH][first_two] << error)
    thread = act_as_operator(kube_api, "train-flaky", lambda m: ("Succeeded", "ok"))
    assert run_pytorch_job(manifest, kube_api.api_client(), 30, 0.05) == "ok"
    thread.join(10)
    assert len(failed) >= 2

"""Contract tests: every container the project ships, started with the command, arguments,
environment, mounts and security context a cluster would give it (``tests/pod_sandbox.py``):

* the InferenceService of ``manifests/serving/`` and the one a promotion really creates: the
  predictor, read-only root, user 1000, no credentials, the model in ``/mnt/models`` (where the
  storage initializer puts it), becomes ready and serves the promoted version;
* the PyTorchJob replicas of ``manifests/training/``: they parse their arguments and reach object
  storage with the Secret's credentials;
* every step of the compiled pipeline YAML: its ``sh -ec`` program and executor arguments, the
  platform's Secret and security context; ingest runs to the end on a real bucket.
"""

from __future__ import annotations

import ctypes.util
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from kfp import dsl
from kfp.local import executor_input_utils
from kfp.pipeline_spec import pipeline_spec_pb2

from brainmri.cpu import TCMALLOC
from brainmri.inference_service import storage_uri_of
from brainmri.storage import ObjectStore, S3Uri
from tests.bundles import save_tiny_bundle
from tests.pod_sandbox import REPO, Image, Pod, run_pod, sandbox_unavailable

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        bool(why := sandbox_unavailable()), reason=f"cannot sandbox pods here: {why}"
    ),
]
SERVING_IMAGE = Image.from_dockerfile(REPO / "serving" / "Dockerfile")
COMPONENT_IMAGE = Image.from_dockerfile(REPO / "components" / "Dockerfile")
SHIPPED_ISVC = REPO / "manifests" / "serving" / "inferenceservice.yaml"
SHIPPED_JOB = REPO / "manifests" / "training" / "pytorchjob.yaml"
COMPILED = REPO / "pipelines" / "brain_mri_pipeline.yaml"


def bundle(folder: Path, version: str) -> Path:
    return save_tiny_bundle(folder, version=version)


def predictor_pod(isvc: dict[str, Any], models: Path) -> Pod:
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    return Pod(container, predictor, SERVING_IMAGE, volumes={"/mnt/models": models})


def served_version(name: str) -> str:
    """Python run in the pod's network once it is ready: print the served model version."""
    return (
        "import json, urllib.request\n"
        f"url = 'http://127.0.0.1:8080/v1/models/{name}:predict'\n"
        "body = json.dumps({'instances': []}).encode()\n"
        "try:\n"
        "    urllib.request.urlopen(urllib.request.Request(url, body))\n"
        "except urllib.error.HTTPError as err:\n"
        "    print('ANSWER', err.code)\n"
        f"meta = urllib.request.urlopen('http://127.0.0.1:8080/v2/models/{name}').read()\n"
        "print('METADATA', meta.decode())\n"
    )


def test_the_sandbox_enforces_the_security_context(tmp_path: Path) -> None:
    """The stand-in is only as good as its fidelity: a read-only root refuses writes, /tmp
    takes them, the user is 1000 and holds no capability."""
    container = {
        "name": "probe",
        "command": ["sh", "-c"],
        "args": [
            "id -u; grep CapEff /proc/self/status; touch /tmp/ok && echo TMP-OK; "
            "touch /etc/nope 2>&1 || echo ROOT-READ-ONLY"
        ],
        "securityContext": {"readOnlyRootFilesystem": True, "runAsUser": 1000},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    pod = {"volumes": [{"name": "tmp", "emptyDir": {}}]}
    outcome = run_pod(Pod(container, pod, SERVING_IMAGE))
    assert outcome.output.splitlines()[0] == "1000", outcome.output
    assert "CapEff:\t0000000000000000" in outcome.output
    assert "TMP-OK" in outcome.output and "ROOT-READ-ONLY" in outcome.output


def test_the_shipped_inferenceservice_starts(tmp_path: Path) -> None:
    isvc = yaml.safe_load(SHIPPED_ISVC.read_text())
    pod = predictor_pod(isvc, bundle(tmp_path / "models", "v-shipped"))
    assert not [k for k in pod.environment() if k.startswith("AWS_")]  # no credentials at all
    outcome = run_pod(
        pod, probe_port=8080, own_network=True, check=served_version(isvc["metadata"]["name"])
    )
    assert outcome.ready, outcome.output[-4000:]
    assert "ANSWER 400" in outcome.output  # an empty batch is a clear 400
    assert '"name":"brain-mri-classifier"' in outcome.output


def test_the_promoted_inferenceservice_serves_the_promoted_version(
    store: ObjectStore, bucket: str, kube_api: Any, tmp_path: Path
) -> None:
    from tests.kube_emulator import FakeKServe
    from tests.test_promote import NAME, NAMESPACE, Rollouts, kserve_outcome

    rollouts = Rollouts(store, bucket, kube_api, tmp_path)
    with FakeKServe(kube_api, NAME, NAMESPACE, kserve_outcome):
        promotion = rollouts.promote(1)
    isvc = rollouts.stored()
    models = tmp_path / "mnt-models"  # what the storage initializer downloads
    store.download_dir(S3Uri.parse(storage_uri_of(isvc)), models, progress=False)
    outcome = run_pod(
        predictor_pod(isvc, models), probe_port=8080, own_network=True, check=served_version(NAME)
    )
    assert outcome.ready, outcome.output[-4000:]
    assert promotion.version in outcome.output  # the model that was promoted is served


@pytest.mark.parametrize("replica", ["Master", "Worker"])
def test_the_pytorchjob_replicas_start(replica: str, s3_env: dict[str, str]) -> None:
    """Each replica parses its --train-run, reaches object storage with the Secret's
    credentials (the cluster's service address stands in for the local server) and stops
    on the missing staged dataset with a message naming it."""
    job = yaml.safe_load(SHIPPED_JOB.read_text())
    template = job["spec"]["pytorchReplicaSpecs"][replica]["template"]["spec"]
    (container,) = template["containers"]
    ObjectStore().ensure_bucket("models")
    secrets = {
        ("minio-credentials", k): s3_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    operator_env = {  # what the training operator sets
        "MASTER_ADDR": "localhost",
        "MASTER_PORT": "23456",
        "WORLD_SIZE": "2",
        "RANK": "0" if replica == "Master" else "1",
    }
    pod = Pod(
        container,
        template,
        COMPONENT_IMAGE,
        secrets=secrets,
        env_overrides={"S3_ENDPOINT": s3_env["S3_ENDPOINT"], "S3_RETRY_S": "2"},
        extra_env=operator_env,
    )
    outcome = run_pod(pod, timeout_s=120)
    assert outcome.returncode != 0
    assert "nothing found under s3://models/staging/<run-id>/dataset" in outcome.output, (
        outcome.output[-3000:]
    )
    assert "usage:" not in outcome.output and "ModuleNotFoundError" not in outcome.output
    assert_trains_on_tcmalloc(outcome.output, replica)


def assert_trains_on_tcmalloc(output: str, replica: str) -> None:
    """The image's LD_PRELOAD (tcmalloc, installed by its Dockerfile) loaded in the replica;
    here that needs Debian's libtcmalloc-minimal4 (``make test`` installs it when it can)."""
    assert COMPONENT_IMAGE.env["LD_PRELOAD"] == TCMALLOC
    assert f"replica {1 if replica == 'Worker' else 0} of 2" in output, output[-3000:]
    if ctypes.util.find_library("tcmalloc_minimal") is None:
        pytest.skip(
            "libtcmalloc-minimal4 is not installed here (apt-get install it): the image's "
            f"LD_PRELOAD={TCMALLOC} could not load, so the {replica} ran on glibc malloc"
        )
    assert "malloc tcmalloc" in output, output[-3000:]


def compiled_steps() -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(COMPILED.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def step_pod(
    name: str,
    arguments: dict[str, Any],
    task_root: Path,
    s3_env: dict[str, str],
    more_secrets: dict[tuple[str, str], str] | None = None,
) -> tuple[Pod, Path]:
    """The pod of step ``name`` as KFP starts it, its {{$}} an executor input for
    ``arguments``, the cluster's Secrets the MinIO credentials and ``more_secrets``; returns it
    and where its executor output goes."""
    spec, platforms = compiled_steps()
    executor = spec["deploymentSpec"]["executors"][f"exec-{name}"]["container"]
    component = json_format.ParseDict(
        spec["components"][f"comp-{name}"], pipeline_spec_pb2.ComponentSpec()
    )
    executor_input = executor_input_utils.construct_executor_input(
        component, arguments, str(task_root), block_input_artifact=False
    )
    task_root.mkdir(parents=True, exist_ok=True)
    task_root.chmod(0o777)  # the step's user (1000) writes its outputs here
    text = json_format.MessageToJson(executor_input)
    container = {
        "name": "main",
        "command": executor["command"],
        "args": [text if a == "{{$}}" else a for a in executor["args"]],
        "env": executor.get("env", []),
    }
    platform = platforms.get(f"exec-{name}", {})
    for source in platform.get("secretAsEnv", []):
        for pair in source["keyToEnv"]:
            container["env"].append(
                {
                    "name": pair["envVar"],
                    "valueFrom": {
                        "secretKeyRef": {
                            "name": source["secretName"],
                            "key": pair["secretKey"],
                            "optional": bool(source.get("optional", False)),
                        }
                    },
                }
            )
    context = platform.get("securityContext", {})
    container["securityContext"] = {
        "runAsUser": int(context.get("runAsUser", 0)),
        "runAsGroup": int(context.get("runAsGroup", 0)),
        "runAsNonRoot": context.get("runAsNonRoot", False),
    }
    pod = {"volumes": [{"name": "tmp", "emptyDir": {}}]}
    container["volumeMounts"] = [{"name": "tmp", "mountPath": "/tmp"}]
    secrets = {
        ("minio-credentials", k): s3_env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    } | (more_secrets or {})
    overrides = {"S3_ENDPOINT": s3_env["S3_ENDPOINT"], "S3_RETRY_S": "2"}
    output_file = Path(json.loads(text)["outputs"]["outputFile"])
    pod = Pod(
        container,
        pod,
        COMPONENT_IMAGE,
        secrets=secrets,
        env_overrides=overrides,
        writable=[task_root],  # where the KFP launcher collects the step's outputs
    )
    return pod, output_file


def test_ingest_runs_from_the_compiled_yaml_as_its_pod(
    s3_env: dict[str, str], demo_dir: Path, tmp_path: Path
) -> None:
    store = ObjectStore()
    store.upload_dir(demo_dir, S3Uri("models", "raw"), progress=False)
    spec, _ = compiled_steps()
    pod, output_file = step_pod(
        "ingest",
        {"source": "s3://models/raw", "copy_threshold": 2.0, "neighbour_threshold": 8.0},
        tmp_path / "ingest",
        s3_env,
    )
    assert pod.security("runAsUser") == 1000 and pod.security("runAsNonRoot")
    outcome = run_pod(pod, timeout_s=180)
    assert outcome.returncode == 0, outcome.output[-4000:]
    assert output_file.is_file(), outcome.output[-3000:]
    result = json.loads(output_file.read_text())
    assert result["parameterValues"]["Output"] is True
    manifest = next((tmp_path / "ingest").rglob("manifest.csv"))
    assert len(manifest.read_text().splitlines()) == 1 + 48


def test_ingest_pod_reads_dicom_with_the_salt_of_its_optional_secret(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    """DICOM from the bucket: with the Secret brain-mri-dicom the pod keeps salted patient
    keys; without it (the Secret is optional) it starts and stops saying how to set the salt."""
    from brainmri.demo_dicom import generate_demo_dicom

    generate_demo_dicom(tmp_path / "dicom", per_class=6, size=48, seed=1, slices_per_patient=2)
    ObjectStore().upload_dir(tmp_path / "dicom", S3Uri("models", "dicom"), progress=False)
    arguments = {"source": "s3://models/dicom", "copy_threshold": 2.0, "neighbour_threshold": 8.0}
    salt = {("brain-mri-dicom", "BRAINMRI_ID_SALT"): "pod-salt-0123456789abcdef"}
    pod, output_file = step_pod("ingest", arguments, tmp_path / "salted", s3_env, salt)
    outcome = run_pod(pod, timeout_s=180)
    assert outcome.returncode == 0 and output_file.is_file(), outcome.output[-4000:]
    manifest = next((tmp_path / "salted").rglob("manifest.csv")).read_text()
    assert manifest.count(",DICOM,") == 24 and "PID-" not in manifest
    pod, _ = step_pod("ingest", arguments, tmp_path / "unsalted", s3_env)
    outcome = run_pod(pod, timeout_s=180)
    assert outcome.returncode != 0 and "BRAINMRI_ID_SALT is not set" in outcome.output


@pytest.mark.parametrize("step", ["split", "train", "evaluate", "gate", "promote"])
def test_every_other_step_starts_from_the_compiled_yaml(
    step: str, s3_env: dict[str, str], tmp_path: Path
) -> None:
    """Given inputs that are not there, each step's program starts, parses its executor
    input and fails in the step's own code naming what is missing (not in argument parsing)."""
    spec, _ = compiled_steps()
    component = spec["components"][f"comp-{step}"]["inputDefinitions"]
    arguments: dict[str, Any] = {}
    for name in component.get("artifacts", {}):
        arguments[name] = dsl.Artifact(name=name, uri=str(tmp_path / "missing" / name))
    defaults = {
        "NUMBER_DOUBLE": 0.5,
        "NUMBER_INTEGER": 1,
        "STRING": "x",
        "BOOLEAN": False,
        "STRUCT": {},
    }
    for name, parameter in component.get("parameters", {}).items():
        if "defaultValue" not in parameter:
            arguments[name] = defaults[parameter["parameterType"]]
    if step == "promote":
        arguments["serving_policy"] = {"allowed_images": ["x"]}
    pod, _ = step_pod(step, arguments, tmp_path / step, s3_env)
    outcome = run_pod(pod, timeout_s=180)
    assert outcome.returncode != 0
    frames = outcome.output.split("Traceback (most recent call last):")[-1]
    error = [line for line in frames.splitlines() if line.strip()][-1]
    print(f"{step}: {error}")
    assert f", in {step}\n" in frames, frames[-3000:]  # it failed in the step's own code
    assert str(tmp_path / "missing") in error, error  # naming what is missing
    for wrong in ("usage:", "ModuleNotFoundError", "TypeError", "KeyError"):
        assert not error.startswith(wrong), error

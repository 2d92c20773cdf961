"""The DAG: compiled YAML for a cluster, and the real run under ``kfp.local`` on local S3."""

from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from kfp import dsl

from brainmri.registry import dataset_record_uri, production_record_uri
from brainmri.storage import ObjectStore, S3Uri
from components.config import DEMO_TRAINING, to_dict
from pipelines.__main__ import DEFAULT_YAML, compile_pipeline, main, run_local
from pipelines.cluster import ClusterOptions, apply_cluster_options
from pipelines.pipeline import build_pipeline
from tests.bundles import upload_demo_set

STEPS = {"ingest", "split", "train", "evaluate", "gate", "promote"}
OBJECT_STORAGE_STEPS = {"ingest", "train", "gate", "promote"}


def compile_to_dicts(path: Path, options: ClusterOptions | None = None) -> tuple[dict, dict]:
    """The pipeline spec and the Kubernetes platform executors of a compile."""
    documents = list(yaml.safe_load_all(compile_pipeline(path, options).read_text()))
    platform = documents[1] if len(documents) > 1 else {}
    executors = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {})
    return documents[0], executors.get("executors", {})


def all_tasks(spec: dict) -> dict[str, dict]:
    """Every task of the root DAG and of sub-DAGs (the accuracy gate's condition)."""
    dags = [spec["root"]["dag"]] + [c["dag"] for c in spec["components"].values() if "dag" in c]
    return {name: task for dag in dags for name, task in dag["tasks"].items()}


@pytest.fixture(scope="module")
def compiled_both(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    return compile_to_dicts(tmp_path_factory.mktemp("yaml") / "pipeline.yaml")


@pytest.fixture(scope="module")
def compiled(compiled_both: tuple[dict, dict]) -> dict:
    return compiled_both[0]


@pytest.fixture(scope="module")
def gpu_compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    path = tmp_path_factory.mktemp("gpu") / "pipeline.yaml"
    return compile_to_dicts(path, ClusterOptions(gpu=True))


def test_compiled_yaml_has_every_step_and_the_gates(compiled: dict) -> None:
    executors = compiled["deploymentSpec"]["executors"]
    assert {name.removeprefix("exec-") for name in executors} == STEPS
    conditions = {
        name: task for name, task in all_tasks(compiled).items() if "triggerPolicy" in task
    }
    by_channel = {task["triggerPolicy"]["condition"]: task for task in conditions.values()}
    new_data = next(t for c, t in by_channel.items() if "ingest-Output" in c)
    accuracy = next(t for c, t in by_channel.items() if "gate-Output" in c)
    new_data_dag = compiled["components"][new_data["componentRef"]["name"]]["dag"]["tasks"]
    assert {"split", "train", "evaluate", "gate"} <= set(new_data_dag)
    assert "promote" in compiled["components"][accuracy["componentRef"]["name"]]["dag"]["tasks"]
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert {
        "source",
        "threshold",
        "train",
        "augment",
        "skip_if_unchanged",
        "external_test_source",
    } <= set(params)
    assert params["train"]["parameterType"] == "STRUCT"  # one JSON object: every knob in the UI
    assert "isOptional" not in params["source"]  # the only required parameter


def test_components_run_in_the_shared_image_without_reinstalling_kfp(compiled: dict) -> None:
    for executor in compiled["deploymentSpec"]["executors"].values():
        container = executor["container"]
        assert container["image"].endswith("/components:0.1.0")
        assert "pip install" not in " ".join(container["command"])


def test_every_step_has_cpu_and_memory_requests_and_limits(compiled: dict) -> None:
    for name, executor in compiled["deploymentSpec"]["executors"].items():
        resources = executor["container"]["resources"]
        for key in ("CpuRequest", "CpuLimit", "MemoryRequest", "MemoryLimit"):
            assert resources[f"resource{key}"], f"{name} has no {key}"
        assert "accelerator" not in resources  # the default build is CPU only


def test_object_storage_steps_get_credentials_endpoint_and_retries(
    compiled_both: tuple[dict, dict],
) -> None:
    spec, platform = compiled_both
    with_secret = {name for name, e in platform.items() if "secretAsEnv" in e}
    assert with_secret == {f"exec-{step}" for step in OBJECT_STORAGE_STEPS}
    for step in OBJECT_STORAGE_STEPS:
        secrets = {s["secretName"]: s for s in platform[f"exec-{step}"]["secretAsEnv"]}
        assert set(secrets) == {"minio-credentials"} | (
            {"brain-mri-dicom"} if step == "ingest" else set()
        )
        secret = secrets["minio-credentials"]
        assert {(k["secretKey"], k["envVar"]) for k in secret["keyToEnv"]} == {
            ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
            ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
        }
        env = {
            e["name"]: e["value"]
            for e in spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["env"]
        }
        assert env["S3_ENDPOINT"] == "minio.brain-mri.svc.cluster.local:9000"
    tasks = all_tasks(spec)
    for step in STEPS:
        retry = tasks[step].get("retryPolicy")
        if step in OBJECT_STORAGE_STEPS:
            assert retry["maxRetryCount"] == 3 and retry["backoffFactor"] == 2.0
            assert retry["backoffDuration"] == "30s"
        else:
            assert retry is None, f"{step} should not be retried"


def test_a_tracking_server_reaches_the_steps_that_track(compiled: dict, tmp_path: Path) -> None:
    def tracking_env(spec: dict) -> dict[str, str]:
        executors = spec["deploymentSpec"]["executors"]
        return {
            name.removeprefix("exec-"): e["value"]
            for name, executor in executors.items()
            for e in executor["container"].get("env", [])
            if e["name"] == "MLFLOW_TRACKING_URI"
        }

    assert tracking_env(compiled) == {}  # the default: nothing tracked
    out = tmp_path / "tracked.yaml"
    main(["compile", "--output", str(out), "--mlflow-tracking-uri", "http://mlflow.mlflow:5000"])
    spec = next(yaml.safe_load_all(out.read_text()))
    tracked = {
        step: "http://mlflow.mlflow:5000" for step in ("train", "evaluate", "gate", "promote")
    }
    assert tracking_env(spec) == tracked
    gate_inputs = spec["components"]["comp-gate"]["inputDefinitions"]["parameters"]
    assert gate_inputs["champion_from"]["defaultValue"] == "production"


def test_ingest_gets_the_dicom_salt_and_pacs_credentials_each_optional(
    compiled_both: tuple[dict, dict],
) -> None:
    _, platform = compiled_both
    [dicom] = [
        s for s in platform["exec-ingest"]["secretAsEnv"] if s["secretName"] != "minio-credentials"
    ]
    assert dicom["secretName"] == "brain-mri-dicom" and dicom["optional"] is True
    assert {k["envVar"] for k in dicom["keyToEnv"]} == {
        "BRAINMRI_ID_SALT",
        "DICOMWEB_USERNAME",
        "DICOMWEB_PASSWORD",
        "DICOMWEB_TOKEN",
    }


def test_only_pure_data_steps_may_come_from_the_cache(compiled: dict) -> None:
    tasks = all_tasks(compiled)
    cached = {n for n, t in tasks.items() if t.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"split"}  # not ingest: it lists the bucket and reads production


def test_gpu_build_puts_train_on_a_gpu_node(gpu_compiled: tuple[dict, dict]) -> None:
    spec, platform = gpu_compiled
    executors = spec["deploymentSpec"]["executors"]
    accelerator = executors["exec-train"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/gpu" and accelerator["resourceCount"] == "1"
    train = platform["exec-train"]
    assert train["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert train["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    others = [name for name in executors if name != "exec-train"]
    assert not any("accelerator" in executors[n]["container"]["resources"] for n in others)
    assert not any("nodeSelector" in platform.get(n, {}) for n in others)


def test_the_local_build_uses_this_environment_and_fails_fast(tmp_path: Path) -> None:
    spec, platform = compile_to_dicts(tmp_path / "local.yaml", ClusterOptions.for_local())
    for executor in spec["deploymentSpec"]["executors"].values():
        assert "env" not in executor["container"]  # kfp.local applies container env
        assert "resources" not in executor["container"]  # kfp.local warns about each
    assert not any("secretAsEnv" in e for e in platform.values())
    assert not any("retryPolicy" in t for t in all_tasks(spec).values())  # fail fast locally


def test_a_step_without_a_policy_refuses_to_build() -> None:
    @dsl.component(base_image="python:3.11-slim")
    def fingerprint(source: str) -> str:
        return source

    with pytest.raises(ValueError, match="'fingerprint' has no StepPolicy"):

        @dsl.pipeline(name="unconfigured")
        def unconfigured(source: str) -> None:
            fingerprint(source=source)
            apply_cluster_options(ClusterOptions())


def test_cli_compile_applies_the_cluster_flags(tmp_path: Path) -> None:
    out = tmp_path / "custom.yaml"
    main(
        [
            "compile",
            "--output",
            str(out),
            "--gpu",
            "--image",
            "registry.example/components:2",
            "--toleration",
            "dedicated=ml:NoExecute",
            "--node-selector",
            "pool=gpu",
            "--resources",
            "train:memory_limit=32Gi,cpu_limit=16",
            "--s3-secret",
            "",
            "--dicom-secret",
            "",
            "--retries",
            "0",
        ]
    )
    spec, *rest = yaml.safe_load_all(out.read_text())
    platform = rest[0]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    train = spec["deploymentSpec"]["executors"]["exec-train"]["container"]
    assert train["image"] == "registry.example/components:2"
    assert train["resources"]["resourceMemoryLimit"] == "32Gi"
    assert train["resources"]["resourceCpuLimit"] == "16"
    assert platform["exec-train"]["nodeSelector"]["labels"] == {"pool": "gpu"}
    assert platform["exec-train"]["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoExecute"}
    ]
    assert not any("secretAsEnv" in e for e in platform.values())
    assert not any("retryPolicy" in t for t in all_tasks(spec).values())


def test_the_serving_policy_is_a_compile_time_constant(tmp_path: Path) -> None:
    """serving_image stays a run parameter, but promote only deploys an image the compiled
    allow-list names; the deployment mode and replicas come with it."""
    out = tmp_path / "serving.yaml"
    main(
        [
            "compile",
            "--output",
            str(out),
            "--allowed-serving-image",
            "registry.example/predictor:1",
            "--allowed-serving-image",
            "registry.example/predictor:2",
            "--serving-deployment-mode",
            "RawDeployment",
            "--serving-max-replicas",
            "1",
        ]
    )
    spec = yaml.safe_load_all(out.read_text()).__next__()
    promote = all_tasks(spec)["promote"]["inputs"]["parameters"]
    policy = promote["serving_policy"]["runtimeValue"]["constant"]
    assert policy["allowed_images"] == [
        "registry.example/predictor:1",
        "registry.example/predictor:2",
    ]
    assert policy["deployment_mode"] == "RawDeployment" and policy["max_replicas"] == 1
    assert "serving_policy" not in spec["root"]["inputDefinitions"]["parameters"]  # not a knob
    assert promote["serving_image"]["componentInputParameter"].endswith("serving_image")


def test_build_pipeline_keeps_one_signature_for_every_option() -> None:
    default = build_pipeline().component_spec.inputs
    custom = build_pipeline(ClusterOptions(serving_image="r.example/p:1")).component_spec.inputs
    assert default.keys() == custom.keys()
    assert custom["serving_image"].default == "r.example/p:1"


def test_cli_compile_writes_yaml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["compile", "--output", str(tmp_path / "p.yaml")])
    assert (tmp_path / "p.yaml").is_file() and "wrote" in capsys.readouterr().out


@pytest.fixture(scope="module")
def demo_source(s3_env: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A demo set big enough for the tiny CNN to pass a 0.5 gate reliably, in the bucket."""
    return upload_demo_set(tmp_path_factory.mktemp("e2e-demo"), "e2e-data", 30, seed=2)


def run(source: str, tmp_path: Path, epochs: int = 12, **params: object) -> None:
    demo = replace(DEMO_TRAINING, epochs=epochs, batch_size=16)  # what `make run` trains
    arguments = {"source": source, "models_bucket": "e2e-models", "train": to_dict(demo)}
    run_local(arguments | params, tmp_path / "root")


def model_versions(store: ObjectStore, model_name: str) -> set[str]:
    """The version folders published for ``model_name`` (not its records or checkpoints)."""
    keys = store.list_keys(S3Uri("e2e-models", model_name))
    parts = (key.split("/") for key in keys)
    return {p[1] for p in parts if len(p) == 3 and p[2] == "model.pt"}


def trained_runs(store: ObjectStore) -> set[str]:
    """Runs whose train step started (each checkpoints under ``checkpoints/<run id>/``)."""
    store.ensure_bucket("e2e-models")
    return {key.split("/")[1] for key in store.list_keys(S3Uri("e2e-models", "checkpoints"))}


def test_pipeline_promotes_a_model_that_passes_the_gate(demo_source: str, tmp_path: Path) -> None:
    run(demo_source, tmp_path, threshold=0.5, model_name="passes")
    store = ObjectStore()
    record = store.get_json(production_record_uri("e2e-models", "passes"))
    assert record["accuracy"] >= 0.5 and len(record["data_fingerprint"]) == 64
    uri = S3Uri.parse(record["storage_uri"])
    assert store.exists(uri.child("model.pt")) and store.exists(uri.child("model.json"))
    assert record["version"].endswith(record["data_fingerprint"][:8])
    dataset_record = dataset_record_uri("e2e-models", "passes", record["data_fingerprint"])
    assert store.exists(dataset_record)  # ingest recorded the dataset it saw

    # a scheduled run on the same data stops cleanly after ingest: nothing new is trained
    trained = trained_runs(store)
    run(demo_source, tmp_path / "again", threshold=0.5, model_name="passes", skip_if_unchanged=True)
    assert trained_runs(store) == trained
    assert store.get_json(production_record_uri("e2e-models", "passes")) == record
    assert model_versions(store, "passes") == {record["version"]}


def test_pipeline_promotes_nothing_below_the_threshold(demo_source: str, tmp_path: Path) -> None:
    store = ObjectStore()
    trained = trained_runs(store)
    run(
        demo_source, tmp_path, threshold=1.01, model_name="fails", epochs=1, skip_if_unchanged=True
    )  # no production model yet: the new-data check lets it train
    assert len(trained_runs(store) - trained) == 1  # it trained...
    assert not model_versions(store, "fails")  # ...and the gate kept it out
    assert not store.exists(production_record_uri("e2e-models", "fails"))


def test_committed_yaml_is_current(tmp_path: Path) -> None:
    """The YAML in the repository (for upload in the KFP UI) matches the code."""
    fresh = compile_pipeline(tmp_path / "fresh.yaml").read_text()
    assert DEFAULT_YAML.read_text() == fresh, "pipeline YAML is stale: run `make compile`"

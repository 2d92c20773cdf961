"""The DAG: compiled YAML for a cluster, and the real run under ``kfp.local`` on local S3."""

from pathlib import Path

import pytest
import yaml

from brainmri.demo_data import generate_demo_dataset
from brainmri.storage import ObjectStore, S3Uri
from components.promote import production_record_uri
from pipelines.__main__ import DEFAULT_YAML, compile_pipeline, main, run_local

STEPS = {"ingest", "split", "augment", "train", "evaluate", "gate", "promote"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict:
    path = compile_pipeline(tmp_path_factory.mktemp("yaml") / "pipeline.yaml")
    return yaml.safe_load(path.read_text())


def test_compiled_yaml_has_every_step_and_the_gate(compiled: dict) -> None:
    executors = compiled["deploymentSpec"]["executors"]
    assert {name.removeprefix("exec-") for name in executors} == STEPS
    root_tasks = compiled["root"]["dag"]["tasks"]
    condition = next(t for t in root_tasks.values() if "triggerPolicy" in t)
    assert "gate-Output" in condition["triggerPolicy"]["condition"]
    assert "promote" in compiled["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert {"source", "threshold", "epochs", "backbone"} <= set(params)
    assert "isOptional" not in params["source"]  # the only required parameter


def test_components_run_in_the_shared_image_without_reinstalling_kfp(compiled: dict) -> None:
    for executor in compiled["deploymentSpec"]["executors"].values():
        container = executor["container"]
        assert container["image"].endswith("/components:0.1.0")
        assert "pip install" not in " ".join(container["command"])


def test_cli_compile_writes_yaml(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["compile", "--output", str(tmp_path / "p.yaml")])
    assert (tmp_path / "p.yaml").is_file() and "wrote" in capsys.readouterr().out


@pytest.fixture(scope="module")
def demo_source(s3_env: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A demo set big enough for the tiny CNN to pass a 0.5 gate reliably, in the bucket."""
    images = tmp_path_factory.mktemp("e2e-demo")
    generate_demo_dataset(images, per_class=30, size=64, seed=2, progress=False)
    store = ObjectStore()
    store.ensure_bucket("e2e-data")
    store.upload_dir(images, S3Uri("e2e-data", "demo"), progress=False)
    return "s3://e2e-data/demo"


def run(source: str, tmp_path: Path, **params: object) -> None:
    arguments = {
        "source": source,
        "models_bucket": "e2e-models",
        "image_size": 64,
        "epochs": 12,
        "batch_size": 16,
        **params,
    }
    run_local(arguments, tmp_path / "root")


def test_pipeline_promotes_a_model_that_passes_the_gate(demo_source: str, tmp_path: Path) -> None:
    run(demo_source, tmp_path, threshold=0.5, model_name="passes")
    store = ObjectStore()
    record = store.get_json(production_record_uri("e2e-models", "passes"))
    assert record["accuracy"] >= 0.5
    uri = S3Uri.parse(record["storage_uri"])
    assert store.exists(uri.child("model.pt")) and store.exists(uri.child("model.json"))


def test_pipeline_promotes_nothing_below_the_threshold(demo_source: str, tmp_path: Path) -> None:
    run(demo_source, tmp_path, threshold=1.01, model_name="fails", epochs=1)
    store = ObjectStore()
    store.ensure_bucket("e2e-models")
    assert not list(store.list_keys(S3Uri("e2e-models", "fails")))


def test_committed_yaml_is_current(tmp_path: Path) -> None:
    """The YAML in the repository (for upload in the KFP UI) matches the code."""
    fresh = compile_pipeline(tmp_path / "fresh.yaml").read_text()
    assert DEFAULT_YAML.read_text() == fresh, "pipeline YAML is stale: run `make compile`"

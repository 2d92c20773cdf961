"""Experiment tracking and the registry in a real MLflow server (SQLite, artifacts in the local
S3 server): a tracked pipeline run, the gate reading the champion from MLflow, and the faults."""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
from mlflow import MlflowClient

from brainmri.local_servers import free_ports, http_status
from brainmri.registry import production_record_uri
from brainmri.storage import ObjectStore
from brainmri.tracking import (
    CHAMPION_ALIAS,
    TRACKING_URI_ENV,
    TrackingError,
    aliased_version,
    attach_run,
    register_version,
    start_run,
)
from components.config import DEMO_TRAINING, to_dict
from components.experiment_log import (
    SPLIT_MANIFEST_ARTIFACT,
    epoch_logger,
    log_training,
    open_training_run,
    registry_note,
)
from components.gate import find_champion
from pipelines import quickstart
from pipelines.__main__ import run_local
from tests.bundles import upload_demo_set

MODELS = "tracked-models"
EPOCHS = 3


@pytest.fixture(scope="module")
def tracked_source(s3_env: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    return upload_demo_set(tmp_path_factory.mktemp("tracked-demo"), "tracked-data", 16, seed=4)


def run_pipeline(source: str, root: Path, model_name: str, **params: object) -> Path:
    """One kfp.local run that passes the gate whatever the tiny CNN learns; its run folder."""
    demo = replace(DEMO_TRAINING, epochs=EPOCHS, batch_size=16)
    arguments = {
        "source": source,
        "models_bucket": MODELS,
        "model_name": model_name,
        "train": to_dict(demo),
        "threshold": 0.0,
        "tolerance": 1.0,
        "max_recall_drop": 1.0,
    }
    run_local(arguments | params, root)
    (run,) = [path for path in root.iterdir() if path.is_dir()]
    return run


def only_run(client: MlflowClient, experiment: str, *, newest: bool = True):
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"])
    return runs if not newest else runs[0]


def test_a_tracked_run_logs_every_step_registers_the_version_and_gates_on_the_alias(
    tracking: str, tracked_source: str, tmp_path: Path
) -> None:
    client, store, name = MlflowClient(tracking), ObjectStore(), "tracked"
    first = run_pipeline(tracked_source, tmp_path / "first", name)
    record = store.get_json(production_record_uri(MODELS, name))
    run = only_run(client, name)
    assert run.info.status == "FINISHED" and run.data.tags["gate"] == "PROMOTE"
    # train: every knob, the data's fingerprint, each epoch at its step, the split manifest
    assert run.data.params["train.epochs"] == str(EPOCHS)
    assert run.data.params["train.backbone"] == "tiny_cnn"
    assert run.data.tags["data.fingerprint"] == record["data_fingerprint"]
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == list(range(1, EPOCHS + 1))  # each epoch once
    assert {"train_loss", "learning_rate", "best_val_accuracy"} <= set(run.data.metrics)
    # evaluate: the final metrics and the reports
    assert run.data.metrics["test_accuracy"] == pytest.approx(record["accuracy"])
    assert "test_accuracy_ci_low" in run.data.metrics and "test_errors" in run.data.metrics
    reports = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
    assert reports == {f"evaluation/{n}" for n in ("report.html", "report.md", "predictions.csv")}
    page = client.download_artifacts(run.info.run_id, "evaluation/report.html", str(tmp_path))
    assert 'id="confusion"' in Path(page).read_text()
    # gate: the decision's scores
    assert "gate_challenger_accuracy" in run.data.metrics
    # promote: a registered version with what it was trained on, and the champion alias
    champion = aliased_version(name)
    assert champion is not None and champion.number == "1"
    assert champion.source == champion.tags["storage_uri"] == record["storage_uri"]
    assert champion.tags["version"] == record["version"]
    assert champion.tags["data_fingerprint"] == record["data_fingerprint"]
    assert champion.tags["split_manifest"] == f"runs:/{run.info.run_id}/{SPLIT_MANIFEST_ARTIFACT}"
    split = pd.read_csv(client.download_artifacts(run.info.run_id, SPLIT_MANIFEST_ARTIFACT))
    local_split = pd.read_csv(first / "split" / "split_manifest_csv")
    assert split.equals(local_split) and set(split["split"]) == {"train", "val", "test"}
    assert client.get_model_version(name, "1").run_id == run.info.run_id

    # a second run takes its champion from MLflow's alias, then moves the alias to itself
    second = run_pipeline(tracked_source, tmp_path / "second", name, champion_from="mlflow")
    gate_report = (second / "gate" / "gate_report").read_text()
    assert f"champion {record['version']} ({record['storage_uri']}; MLflow's champion alias)" in (
        gate_report
    )
    assert len(only_run(client, name, newest=False)) == 2
    assert aliased_version(name).number == "2"
    newer = store.get_json(production_record_uri(MODELS, name))
    assert aliased_version(name).tags["storage_uri"] == newer["storage_uri"]

    # a person points the alias back at version 1: the gate compares with it, and says that
    # this is not what production serves
    client.set_registered_model_alias(name, CHAMPION_ALIAS, "1")
    found, note = find_champion(MODELS, name, store, "mlflow")
    assert found.storage_uri == record["storage_uri"] and "not what production.json serves" in note
    production, note = find_champion(MODELS, name, store, "production")
    assert production.storage_uri == newer["storage_uri"] and note == ""


def test_a_retried_train_task_writes_into_the_same_run_and_fills_missed_epochs(
    tracking: str, tmp_path: Path
) -> None:
    split_csv = tmp_path / "split.csv"
    split_csv.write_text("path,label,split\na.png,glioma,train\n")
    params, data = {"train": {"epochs": 3}}, {"fingerprint": "f" * 64}
    tracked = open_training_run("retried", "run-7", params, data, split_csv)
    history = [{"epoch": e, "phase": "full", "val_accuracy": e / 10} for e in (1, 2, 3)]
    epoch_logger(tracked)(history[0])  # the first attempt logged epoch 1, then died
    again = open_training_run("retried", "run-7", params, data, split_csv)
    assert again.run_id == tracked.run_id  # found by the pipeline run's id
    log_training(again, history, {"best_val_accuracy": 0.3})  # a PyTorchJob's rows, at the end
    steps = MlflowClient(tracking).get_metric_history(again.run_id, "val_accuracy")
    assert sorted(m.step for m in steps) == [1, 2, 3]
    assert start_run("retried", "another", "run-8").run_id != tracked.run_id


def test_without_the_variable_nothing_is_tracked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    assert start_run("x", "y", "z") is None and attach_run("some-id") is None
    assert register_version("m", "s3://models/m/v", {}) is None and aliased_version("m") is None
    assert epoch_logger(None) is None
    assert registry_note("m", "v", "s3://models/m/v", {}, 0.9, None) == ""
    with pytest.raises(ValueError, match="needs MLFLOW_TRACKING_URI"):
        find_champion("models", "m", ObjectStore.__new__(ObjectStore), "mlflow")


def test_an_unknown_champion_source_is_refused() -> None:
    with pytest.raises(ValueError, match="champion_from='registry': expected one of production"):
        find_champion("models", "m", ObjectStore.__new__(ObjectStore), "registry")


@pytest.mark.integration
def test_an_unreachable_server_fails_fast_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    uri = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    monkeypatch.setenv(TRACKING_URI_ENV, uri)
    started = time.monotonic()
    with pytest.raises(TrackingError, match=f"{uri}.*unset MLFLOW_TRACKING_URI"):
        start_run("x", "y", "z")
    assert time.monotonic() - started < 15  # before any training, not after minutes of retries
    # promote has rolled out by the time it registers: a dead server is a warning, not a failure
    note = registry_note("m", "v1", "s3://models/m/v1", {}, 0.9, "some-run")
    assert note.startswith("not registered: ") and uri in note
    assert "v1 serves and production.json names it" in capsys.readouterr().out


def test_make_run_mlflow_starts_a_local_server_and_prints_its_ui(
    s3_env: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # .run/ goes here
    monkeypatch.delenv(TRACKING_URI_ENV, raising=False)
    (port,) = free_ports(1)
    with quickstart.experiment_tracking(True, port) as uri:
        assert uri == f"http://127.0.0.1:{port}" and http_status(f"{uri}/health") == 200
        assert start_run("quickstart", "one") is not None  # the steps inherit the variable
    assert f"MLflow UI: http://127.0.0.1:{port}" in capsys.readouterr().out
    assert http_status(f"{uri}/health") is None  # stopped with the run
    assert TRACKING_URI_ENV not in os.environ
    with quickstart.experiment_tracking(False, port) as off:
        assert off is None

    # `make mlflow-ui` serves the same runs again, until Ctrl-C
    served: list[str] = []

    def wait() -> None:  # instead of sleeping until Ctrl-C: look at what is served
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("quickstart")
        served.extend(r.info.run_name for r in client.search_runs([experiment.experiment_id]))

    assert quickstart.serve_mlflow_ui(port, wait) == 0 and served == ["one"]
    assert "press Ctrl-C to stop" in capsys.readouterr().out

"""``make run`` end to end: its own local S3 server, demo data, pipeline, served model, query."""

import json
from pathlib import Path

import pytest

from pipelines import quickstart


def test_quickstart_serves_the_promoted_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)  # .run/ goes here
    for name in ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "DATA"):
        monkeypatch.delenv(name, raising=False)  # as on a fresh machine: it starts its own
    assert quickstart.main([]) == 0  # the defaults `make run` uses
    out = capsys.readouterr().out
    answer = json.loads(out[out.index('{\n  "predictions"') : out.rindex("}") + 1])
    prediction = answer["predictions"][0]
    assert prediction["label"] in prediction["probabilities"]
    assert prediction["model_version"] in out  # the version the pipeline just promoted
    assert "stopping local S3 server" in out


def test_demo_trains_the_small_cnn_and_real_data_the_pipeline_recipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DATA", raising=False)
    assert quickstart.training_parameters(quickstart.parse_args([])) == quickstart.DEMO_TRAINING
    real = quickstart.parse_args(["--data", "s3://scans/brain-mri"])
    assert quickstart.training_parameters(real) == {}  # the pipeline's defaults
    tuned = quickstart.parse_args(["--data", "/scans", "--epochs", "3", "--image-size", "160"])
    assert quickstart.training_parameters(tuned) == {"epochs": 3, "image_size": 160}


def test_pipeline_defaults_are_the_measured_real_data_recipe() -> None:
    from components.split import VAL_FRACTION
    from components.train import REAL_DATA_RECIPE
    from pipelines.pipeline import build_pipeline

    inputs = build_pipeline().component_spec.inputs
    assert inputs["backbone"].default == REAL_DATA_RECIPE.backbone == "efficientnet_lite0"
    assert inputs["image_size"].default == REAL_DATA_RECIPE.image_size
    assert inputs["epochs"].default == REAL_DATA_RECIPE.epochs
    assert inputs["val_fraction"].default == VAL_FRACTION

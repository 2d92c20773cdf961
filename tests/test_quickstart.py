"""``make run`` end to end: its own local S3 server, demo data, pipeline, served model, query."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from components.config import (
    DEMO_THRESHOLD,
    DEMO_TRAINING,
    PROMOTION_THRESHOLD,
    VAL_FRACTION,
    AugmentConfig,
    TrainConfig,
    to_dict,
)
from pipelines import quickstart


@pytest.mark.integration
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
    steps = ("ingest", "split", "train", "evaluate", "gate", "promote")
    assert all(re.search(rf"(?:^|\r)ok {step} +SUCCESS +[\d.]+ s  \S", out, re.M) for step in steps)
    assert all((tmp_path / ".run" / "logs" / f"{step}.log").stat().st_size for step in steps)
    assert '"parameterValues"' not in out  # kfp.local's executor JSON is in the logs only
    page = re.search(r"evaluation report: (\S+) \((file://\S+)\)", out)
    assert page and 'id="confusion"' in Path(page.group(1)).read_text()  # the HTML report
    summary = out[out.rindex("data:     ") :].splitlines()  # the five-line summary, then the URL
    assert [line.split(":")[0] for line in summary[:6]] == [
        "data",
        "test",
        "gate",
        "promoted",
        "answer",
        "report",
    ]
    assert "240 images" in summary[0] and "PROMOTE" in summary[2]
    assert prediction["model_version"] in summary[3] and prediction["label"] in summary[4]


def test_demo_trains_the_small_cnn_and_real_data_the_pipeline_recipe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("DATA", raising=False)
    demo = quickstart.training_config(quickstart.parse_args([]))
    assert demo == DEMO_TRAINING and demo.backbone == "tiny_cnn"
    real = quickstart.parse_args(["--data", "s3://scans/brain-mri"])
    assert quickstart.training_config(real) == TrainConfig()  # the pipeline's defaults
    tuned = quickstart.parse_args(["--data", "/scans", "--epochs", "3", "--image-size", "160"])
    assert quickstart.training_config(tuned) == replace(TrainConfig(), epochs=3, image_size=160)
    assert quickstart.promotion_threshold(real) == PROMOTION_THRESHOLD  # the pipeline's
    assert quickstart.promotion_threshold(quickstart.parse_args([])) == DEMO_THRESHOLD
    chosen = quickstart.parse_args(["--threshold", "0.5"])
    assert quickstart.promotion_threshold(chosen) == 0.5


def test_pipeline_defaults_are_the_measured_real_data_recipe() -> None:
    from pipelines.pipeline import build_pipeline

    inputs = build_pipeline().component_spec.inputs
    assert inputs["train"].default == to_dict(TrainConfig())
    assert inputs["train"].default["backbone"] == "efficientnet_lite0"
    assert inputs["augment"].default == to_dict(AugmentConfig())
    assert inputs["val_fraction"].default == VAL_FRACTION
    assert inputs["threshold"].default == PROMOTION_THRESHOLD == 0.96

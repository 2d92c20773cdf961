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

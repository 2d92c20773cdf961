"""``make bench-load`` end to end, small: the server started with the InferenceService's own
arguments, locust's mix, every figure and goal written (a stand-in model: a smoke run)."""

import json
from pathlib import Path

import pytest

from benchmarks import bench_load
from tests.bundles import save_tiny_bundle


@pytest.mark.integration
def test_bench_load_smoke(tmp_path: Path) -> None:
    bundle = save_tiny_bundle(tmp_path / "model")
    with pytest.raises(SystemExit, match="trained EfficientNet-Lite0"):
        bench_load.main(["--model-dir", str(bundle)])
    out = tmp_path / "load.json"
    args = ["--model-dir", str(bundle), "--allow-stand-in", "--requests", "400", "--no-levers"]
    assert bench_load.main([*args, "--unloaded", "10", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    figures = result["figures"]
    assert figures["requests"] == 400 and figures["server_5xx"] == 0
    assert figures["connection_errors"] == 0 and figures["crashes_or_restarts"] == 0
    assert set(result["goals_met"]) >= set(bench_load.GOALS)
    assert result["server_args"][:2] == ["--model_name", bench_load.MODEL_NAME]
    kinds = set(result["outcomes_by_kind"])
    assert {"valid_v1", "oversize_payload", "minus_one_batch", "decompression_bomb"} <= kinds

"""The training-step lever benchmark runs and writes its figures (tiny input, one step)."""

import json
from pathlib import Path

from benchmarks import bench_step


def test_bench_step_smoke(tmp_path: Path) -> None:
    out = tmp_path / "levers.json"
    argv = ["--image-size", "48", "--batch-size", "2", "--steps", "1", "--rounds", "2"]
    argv += ["--levers", "native padding + bf16 autocast"]  # compiling would take minutes
    assert bench_step.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["levers"]) == {bench_step.BASELINE, "native padding + bf16 autocast"}
    assert result["levers"][bench_step.BASELINE]["ratio_to_baseline_median"] == 1.0
    for way in bench_step.AUGMENTATIONS:
        assert 0 < result["augmentation"][way]["share_of_step"][bench_step.BASELINE] < 1

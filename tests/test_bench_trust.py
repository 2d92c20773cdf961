"""``make bench-trust`` end to end, small: a stand-in model on generated slices (the real-data
half), the demo model's pointing game, and ``:explain`` timed through the real server."""

from pathlib import Path

import pytest

from benchmarks import bench_trust
from brainmri.demo_data import generate_demo_dataset
from tests.bundles import save_tiny_bundle


@pytest.mark.integration
def test_bench_trust_smoke(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "slices"
    generate_demo_dataset(data, per_class=40, size=64, seed=3, progress=False)
    model = save_tiny_bundle(tmp_path / "model", image_size=32)
    argv = ["--smoke", "--data", str(data), "--model-dir", str(model), "--out", str(tmp_path / "x")]
    assert bench_trust.main(argv) == 0
    printed = capsys.readouterr().out
    for figure in (
        "held_out",
        "shifted",
        "OOD energy",
        "OOD mahalanobis",
        "explain p50",
        "pointing",
    ):
        assert figure in printed, figure
    assert "goals: {" in printed and not (tmp_path / "x").exists()  # a smoke run writes nothing

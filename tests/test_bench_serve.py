"""``make bench-serve`` end to end, small: raw forward, the real server driven over v1 and v2,
every figure and goal written, each runtime compared with eager PyTorch on a held-out split (a
stand-in model and the demo images: a smoke run, not the served figure)."""

import json
from pathlib import Path

import pytest

from benchmarks import bench_serve


@pytest.mark.integration
def test_bench_serve_smoke(tmp_path: Path, demo_dir: Path) -> None:
    assert bench_serve.main(["--model-dir", str(tmp_path / "none")]) == 2  # no trained model
    out = tmp_path / "serve.json"
    argv = ["--stand-in", "--image-size", "32", "--concurrency", "1", "2", "--batch-sizes", "1"]
    argv += [
        "--images-per-setting",
        "16",
        "--max-seconds-per-setting",
        "5",
        "--profile-seconds",
        "3",
        "--data",
        str(demo_dir),
    ]
    assert bench_serve.main([*argv, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"]["source"].startswith("stand-in")
    assert result["images"]["distinct"] == bench_serve.POOL_SIZE
    assert set(result["raw_forward"]) == {"torch", "onnxruntime", "openvino"}  # each runtime
    assert [row["batch_size"] for row in result["raw_forward"]["openvino"]] == [1]
    assert result["server"] and all(s["images_per_s"] > 0 for s in result["server"])
    assert {s["variant"] for s in result["server"]} == set(bench_serve.VARIANTS)
    assert set(result["goals"]["cold_start_s"]) == set(bench_serve.VARIANTS)
    assert result["goals"]["over_eager_server"] > 0 and result["goals"]["no_errors"]
    profile = result["profile"]
    assert profile["variant"] in bench_serve.VARIANTS
    if "skipped" not in profile:  # py-spy can sample the server here
        assert profile["cores_busy"] and profile["images_per_s_cores_busy"] > 0
    equivalence = result["equivalence_on_the_held_out_split"]
    assert set(bench_serve.EQUIVALENCE_RUNTIMES) <= set(equivalence) and equivalence["images"] > 0
    assert equivalence["openvino"]["max_probability_difference"] <= 1e-3
    assert "mcnemar_p" in equivalence["openvino-int8"]["paired"]


@pytest.mark.unit
def test_the_profile_counts_work_not_waits() -> None:
    from benchmarks.serve_profile import categorise

    pool = "_bootstrap (threading.py:1002);_worker (concurrent/futures/thread.py:{})"
    assert categorise(pool.format(81)) is None  # a pool thread waiting for work
    assert categorise("run (asyncio/base_events.py:1);select (selectors.py:468)") is None
    forward = pool.format(83) + ";run (thread.py:58);__call__ (brainmri/runtimes.py:150)"
    assert categorise(forward) == "forward (runtime)"

"""The training-step lever, allocator and training-speed benchmarks run and write their figures
(tiny input, one step or epoch)."""

import ctypes.util
import json
from pathlib import Path

import pytest

from benchmarks import bench_allocator, bench_step, bench_train_speed


def test_bench_step_smoke(tmp_path: Path) -> None:
    out = tmp_path / "levers.json"
    argv = ["--image-size", "48", "--batch-size", "2", "--steps", "1", "--rounds", "2"]
    argv += ["--levers", "native padding + bf16 autocast"]  # compiling would take minutes
    assert bench_step.main([*argv, "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["levers"]) == {bench_step.BASELINE, "native padding + bf16 autocast"}
    assert result["levers"][bench_step.BASELINE]["ratio_to_baseline_median"] == 1.0
    assert result["setup"]["allocator"] in {"glibc", "jemalloc", "tcmalloc"}
    assert result["levers"][bench_step.BASELINE]["minor_faults_per_step_median"] >= 0
    for way in bench_step.AUGMENTATIONS:
        assert 0 < result["augmentation"][way]["share_of_step"][bench_step.BASELINE] < 1


def test_bench_allocator_runs_each_allocator_in_its_own_process(tmp_path: Path) -> None:
    """glibc and every preloadable allocator on this machine: each child reports the allocator
    it really ran on (the benchmark refuses otherwise), with its page faults per step."""
    present = [
        name
        for name, env in bench_allocator.ALLOCATORS.items()
        if "LD_PRELOAD" in env and ctypes.util.find_library(name.split("-")[0])
    ]
    if not present:
        pytest.skip("neither libjemalloc2 nor libtcmalloc-minimal4 is installed (apt-get install)")
    present = present[:1]  # one preloaded allocator is enough to check the mechanism
    out = tmp_path / "allocators.json"
    argv = ["--image-size", "48", "--batch-size", "2", "--steps", "1", "--rounds", "1"]
    assert bench_allocator.main([*argv, "--allocators", *present, "--out", str(out)]) == 0
    result = json.loads(out.read_text())["allocators"]
    assert set(result) == {"glibc", *present}
    assert all(
        figures["environment"] == bench_allocator.ALLOCATORS[n] for n, figures in result.items()
    )
    assert result["glibc"]["ratio_to_glibc_median"] == 1.0
    assert all(figures["minor_faults_per_step_median"] >= 0 for figures in result.values())


def test_bench_allocator_refuses_an_allocator_that_did_not_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(bench_allocator.ALLOCATORS, "jemalloc", {"LD_PRELOAD": "libnot-one.so.9"})
    argv = ["--image-size", "48", "--batch-size", "2", "--steps", "1", "--rounds", "1"]
    with pytest.raises(SystemExit, match="did not load.*apt-get install libjemalloc2"):
        bench_allocator.main([*argv, "--allocators", "jemalloc", "--out", str(tmp_path / "a")])


def test_bench_train_speed_trains_each_variant_as_a_replica_in_its_own_process(
    demo_dir: Path, tmp_path: Path
) -> None:
    """The old way and the new (on tcmalloc where it is installed) each train real epochs
    through the replica entry point; the malloc each ran on is checked."""
    batched = "batched augmentation, fp32, glibc"
    if ctypes.util.find_library("tcmalloc_minimal") is not None:
        batched = next(reversed(bench_train_speed.VARIANTS))  # the new way, on tcmalloc
    out = tmp_path / "train_speed.json"
    argv = ["--data", str(demo_dir), "--limit-per-class", "12", "--backbone", "tiny_cnn"]
    argv += ["--image-size", "32", "--epochs", "2", "--rounds", "1", "--variants", batched]
    assert bench_train_speed.main([*argv, "--out", str(out)]) == 0
    variants = json.loads(out.read_text())["variants"]
    assert list(variants) == [bench_train_speed.REFERENCE, batched]
    assert variants[bench_train_speed.REFERENCE]["ratio_to_old_median"] == 1.0
    assert all(v["images_per_s_median"] > 0 for v in variants.values())

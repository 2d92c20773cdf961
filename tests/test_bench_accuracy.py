"""The accuracy benchmark end to end on the synthetic demo set (tiny model, one epoch): seeds,
the test-time-flip lever scored paired, the bare loop in the step's precision, the k-fold."""

import json
from pathlib import Path

import pytest

from benchmarks import bench_accuracy, front


def test_bench_accuracy_runs_on_a_tiny_recipe(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_accuracy, "TRAINED_MODEL_DIR", tmp_path / "served")
    out = tmp_path / "accuracy.json"
    recipe = ["--data", str(demo_dir), "--val-fraction", "0.25", "--test-fraction", "0.25"]
    recipe += ["--backbone", "tiny_cnn", "--image-size", "32", "--epochs", "1", "--batch-size", "8"]
    recipe += [
        "--bare-steps",
        "1",
        "--test-time-flip",
        "true",
        "--batched",
        "true",
        "--ema-decay",
        "0.9",
        "--cpu-bf16",
        "true",
    ]
    argv = [*recipe, "--out", str(out), "--seeds", "0", "--kfold", "2"]
    assert bench_accuracy.main(argv) == 0
    result = json.loads(out.read_text())
    seed = result["seeds"][0]
    assert seed["precision"] in {"bf16 autocast", "fp32"} and seed["selected_weights"]
    assert seed["without_test_time_flip"]["images"] == seed["images"] == result["test_images"]
    paired = seed["test_time_flip_paired"]
    assert 0 <= paired["mcnemar_p"] <= 1
    lost = paired["only_without_flip_right"] - paired["only_with_flip_right"]
    assert seed["errors"] - seed["without_test_time_flip"]["errors"] == lost
    assert result["bare_torchvision_loop_channels_last"]["precision"] == seed["precision"]
    assert result["kfold"]["out_of_fold"]["images"] == sum(result["data"]["split_sizes"].values())
    assert (tmp_path / "served" / "model.json").is_file()  # what the serving benchmarks load

    table, svg = tmp_path / "levers.md", tmp_path / "front.svg"
    argv = [str(out), "--reference", str(out), "--table", str(table), "--svg", str(svg)]
    assert front.main(argv) == 0
    rows = [line for line in table.read_text().splitlines() if line.startswith("| reference")]
    assert len(rows) == 2  # the same recipe in two files pools into one point, and it unflipped
    assert any("(scored without the flip)" in row for row in rows)
    assert svg.read_text().lstrip().startswith("<?xml")

    again = tmp_path / "seed1.json"  # the same recipe, another seed: pools into one result
    assert bench_accuracy.main([*recipe, "--seeds", "1", "--out", str(again)]) == 0
    pooled = tmp_path / "pooled.json"
    assert bench_accuracy.main(["--merge", str(out), str(again), "--out", str(pooled)]) == 0
    both = json.loads(pooled.read_text())
    assert [run["seed"] for run in both["seeds"]] == [0, 1]
    assert set(both["test_answers"]["correct"]) == {"0", "1"}
    errors = [r["seeds"][0]["errors"] for r in (result, json.loads(again.read_text()))]
    assert both["errors"]["values"] == errors
    twice = ["--merge", str(out), str(out), "--out", str(pooled)]
    assert bench_accuracy.main(twice) == 2  # seed 0 twice: refused


def test_a_result_that_predates_a_knob_is_named_by_the_value_it_ran() -> None:
    """An old result lacks the knobs added since (it ran them off); named against a reference
    that turns them on, it shows them off, and the reference named against it shows them on."""
    fractions = {"val": 0.1, "test": 0.15}
    old = {
        "training": {"config": {"image_size": 192, "seed": 0}, "augment": {"gamma": 0.2}},
        "data": {"split_fractions": fractions},
    }
    new = {
        "training": {
            "config": {"image_size": 160, "seed": 1, "ema_decay": 0.995, "test_time_flip": True},
            "augment": {"gamma": 0.2, "batched": True},
        },
        "data": {"split_fractions": {**fractions, "val": 0.05}},
        "environment": {"allocator": "tcmalloc"},
    }
    assert front.recipe_name(old, new) == (
        "image_size=192, ema_decay=0.0, test_time_flip=False, batched=False, malloc=glibc, "
        "val_fraction=0.1"
    )
    assert front.recipe_name(new, old) == (
        "image_size=160, ema_decay=0.995, test_time_flip=True, batched=True, malloc=tcmalloc, "
        "val_fraction=0.05"
    )
    assert front.recipe_name(old, old) == "reference"

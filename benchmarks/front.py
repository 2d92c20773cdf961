"""Every measured recipe as a (training minutes, accuracy) point: one table and the front.

    python -m benchmarks.front                       # the committed results
    python -m benchmarks.front A.json B.json --reference benchmarks/results/accuracy.json

Reads accuracy-benchmark results (``make bench-accuracy``, one recipe each, trained with one or
more seeds on the same grouped split; files of the same recipe, run with other seeds, pool into
one point) and prints a Markdown table: the recipe (the knobs where it
differs from the reference), training minutes and accuracy as mean ± sd over its seeds, mean
errors, and the paired comparison with the reference on the seeds both ran (images only the
recipe answers right vs only the reference, McNemar's exact p per seed). A model trained with a
test-time flip is a second point too, scored without the flip (same models, same minutes). Writes
the table to ``benchmarks/results/levers.md`` and the plot, with the Pareto front (no other point
both faster and more accurate), to ``benchmarks/results/front.svg``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR
from components.statistics import compare_paired

REFERENCE = RESULTS_DIR / "accuracy.json"
RECIPES_DIR = RESULTS_DIR / "recipes"  # one result per recipe tried, beside the reference
SPLIT_KNOBS = ("val", "test")
# the value each knob had before it existed: what a result that predates the knob ran
PREDATES: dict[str, dict[str, Any]] = {
    "config": {
        "head_learning_rate_scale": 1.0,
        "ema_decay": 0.0,
        "test_time_flip": False,
        "cpu_bf16": False,
    },
    "augment": {"batched": False},
    "environment": {"allocator": "glibc"},
}


@dataclass
class Point:
    """One recipe's figures over its seeds."""

    name: str
    seeds: list[int]
    minutes: list[float]
    accuracy: list[float]
    errors: list[int]
    correct: dict[str, list[bool]] = field(default_factory=dict)  # per seed, test-image order
    paths: list[str] = field(default_factory=list)

    @property
    def mean_minutes(self) -> float:
        return statistics.fmean(self.minutes)

    @property
    def mean_accuracy(self) -> float:
        return statistics.fmean(self.accuracy)

    @property
    def accuracy_sd(self) -> float:
        return statistics.stdev(self.accuracy) if len(self.accuracy) > 1 else 0.0


def predated(knobs: dict[str, Any], part: str) -> dict[str, Any]:
    """``knobs`` (in their order) with the value of each knob it predates added at the end."""
    return knobs | {k: v for k, v in PREDATES[part].items() if k not in knobs}


def recipe_name(result: dict[str, Any], reference: dict[str, Any]) -> str:
    """The knobs (training, augmentation, malloc, split fractions) where ``result`` differs."""
    changes = []
    for part in ("config", "augment"):
        mine, theirs = (predated(r["training"][part], part) for r in (result, reference))
        changes += [f"{k}={v}" for k, v in mine.items() if k != "seed" and theirs.get(k) != v]
    mine, theirs = (predated(r.get("environment", {}), "environment") for r in (result, reference))
    if mine["allocator"] != theirs["allocator"]:
        changes.append(f"malloc={mine['allocator']}")
    mine, theirs = result["data"]["split_fractions"], reference["data"]["split_fractions"]
    changes += [f"{k}_fraction={mine[k]}" for k in SPLIT_KNOBS if mine.get(k) != theirs.get(k)]
    return ", ".join(changes) or "reference"


def points(result: dict[str, Any], reference: dict[str, Any]) -> list[Point]:
    """The recipe's point, and its point without the test-time flip when it has one."""
    name = recipe_name(result, reference)
    seeds = result["seeds"]
    main = Point(
        name,
        [s["seed"] for s in seeds],
        [s["training_minutes"] for s in seeds],
        [s["accuracy"] for s in seeds],
        [s["errors"] for s in seeds],
        result["test_answers"]["correct"],
        result["test_answers"]["paths"],
    )
    unflipped = [s["without_test_time_flip"] for s in seeds if "without_test_time_flip" in s]
    if len(unflipped) != len(seeds):
        return [main]
    return [
        main,
        Point(
            f"{name} (scored without the flip)",
            main.seeds,
            main.minutes,
            [s["accuracy"] for s in unflipped],
            [s["errors"] for s in unflipped],
        ),
    ]


def pooled(everyone: list[Point]) -> list[Point]:
    """Points of the same recipe (other seeds, other files) as one, in first-seen order; a seed
    already pooled is not counted twice."""
    merged: dict[str, Point] = {}
    for point in everyone:
        if point.name not in merged:
            merged[point.name] = Point(point.name, [], [], [], [], {}, point.paths)
        into = merged[point.name]
        for i, seed in enumerate(point.seeds):
            if seed in into.seeds:
                continue
            into.seeds.append(seed)
            into.minutes.append(point.minutes[i])
            into.accuracy.append(point.accuracy[i])
            into.errors.append(point.errors[i])
            if str(seed) in point.correct:
                into.correct[str(seed)] = point.correct[str(seed)]
    return list(merged.values())


def paired_with(point: Point, reference: Point) -> str:
    """``only this right vs only the reference right (p ...)`` per shared seed, or a dash."""
    if not point.correct or point.paths != reference.paths or point.name == reference.name:
        return "—"
    cells = []
    for seed in sorted(set(point.correct) & set(reference.correct), key=int):
        paired = compare_paired(point.correct[seed], reference.correct[seed])
        cells.append(
            f"seed {seed}: {paired.only_first_right} vs {paired.only_second_right} "
            f"(p {paired.mcnemar_p:.2g})"
        )
    return "; ".join(cells) or "no shared seed"


def on_front(point: Point, everyone: list[Point]) -> bool:
    """No other point is at least as fast and as accurate, and better in one of the two."""
    return not any(
        other.mean_minutes <= point.mean_minutes
        and other.mean_accuracy >= point.mean_accuracy
        and (other.mean_minutes, other.mean_accuracy) != (point.mean_minutes, point.mean_accuracy)
        for other in everyone
    )


def table(everyone: list[Point], reference: Point) -> str:
    """The Markdown table of every point, fastest first."""
    rows = [
        "| recipe (differences from the reference) | seeds | training min | accuracy % "
        "| errors | paired with the reference: only this right vs only it right | front |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for point in sorted(everyone, key=lambda p: p.mean_minutes):
        rows.append(
            f"| {point.name} | {', '.join(map(str, point.seeds))} | {point.mean_minutes:.1f} "
            f"| {100 * point.mean_accuracy:.2f} ± {100 * point.accuracy_sd:.2f} "
            f"| {statistics.fmean(point.errors):.1f} | {paired_with(point, reference)} "
            f"| {'yes' if on_front(point, everyone) else ''} |"
        )
    return "\n".join(rows) + "\n"


def plot(everyone: list[Point], path: Path) -> None:
    """Training minutes against accuracy, sd error bars, the front joined up."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for number, point in enumerate(everyone, 1):
        axes.errorbar(
            point.mean_minutes,
            100 * point.mean_accuracy,
            yerr=100 * point.accuracy_sd,
            fmt="o",
            capsize=3,
            label=f"{number}: {point.name}"[:90],
        )
        axes.annotate(
            str(number),
            (point.mean_minutes, 100 * point.mean_accuracy),
            xytext=(5, 5),
            textcoords="offset points",
        )
    front = sorted((p for p in everyone if on_front(p, everyone)), key=lambda p: p.mean_minutes)
    axes.plot(
        [p.mean_minutes for p in front],
        [100 * p.mean_accuracy for p in front],
        "k--",
        linewidth=0.8,
        label="front",
    )
    axes.set_xlabel("training minutes (2 CPU cores)")
    axes.set_ylabel("accuracy on the grouped test split, %")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=6, loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="svg", metadata={"Date": None})
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.front", description=__doc__)
    parser.add_argument("results", type=Path, nargs="*", help=f"default: {RECIPES_DIR}/*.json")
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--table", type=Path, default=RESULTS_DIR / "levers.md")
    parser.add_argument("--svg", type=Path, default=RESULTS_DIR / "front.svg")
    args = parser.parse_args(argv)
    try:
        reference = json.loads(args.reference.read_text())
        others = [
            json.loads(p.read_text()) for p in args.results or sorted(RECIPES_DIR.glob("*.json"))
        ]
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    mine = points(reference, reference)
    everyone = pooled(
        mine + [p for result in others if "seeds" in result for p in points(result, reference)]
    )
    text = table(everyone, everyone[0])
    args.table.parent.mkdir(parents=True, exist_ok=True)
    args.table.write_text(text)
    plot(everyone, args.svg)
    print(text, end="")
    print(f"wrote {args.table} and {args.svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two accuracy-benchmark results compared on the same test images, paired (McNemar).

    python -m benchmarks.compare benchmarks/results/accuracy.json other.json

Both results must come from the same split (the same test images, in the same order); seeds
present in both are compared one to one: how many test images only the first recipe answers
right, how many only the second, and McNemar's exact p-value of those discordant pairs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from components.statistics import compare_paired


def compare(first: dict[str, Any], second: dict[str, Any]) -> list[dict[str, Any]]:
    """Per seed both ran: the paired counts and McNemar's p (first vs second)."""
    a, b = first["test_answers"], second["test_answers"]
    if a["paths"] != b["paths"]:
        raise ValueError("the two results were scored on different test images: not comparable")
    rows = []
    for seed in sorted(set(a["correct"]) & set(b["correct"]), key=int):
        paired = compare_paired(a["correct"][seed], b["correct"][seed])
        rows.append(
            {
                "seed": int(seed),
                "images": paired.images,
                "first_errors": paired.first_errors,
                "second_errors": paired.second_errors,
                "only_first_right": paired.only_first_right,
                "only_second_right": paired.only_second_right,
                "mcnemar_p": paired.mcnemar_p,
            }
        )
    if not rows:
        raise ValueError("the two results share no training seed")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__)
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args(argv)
    try:
        rows = compare(*(json.loads(p.read_text()) for p in (args.first, args.second)))
    except (OSError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{'seed':>4} {'errors':>13} {'only right':>13} {'McNemar p':>10}")
    for row in rows:
        errors = f"{row['first_errors']:>6} vs {row['second_errors']:<4}"
        right = f"{row['only_first_right']:>6} vs {row['only_second_right']:<4}"
        print(f"{row['seed']:>4} {errors} {right} {row['mcnemar_p']:>10.3g}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ingest throughput on the real data set: ``python -m benchmarks.bench_ingest``.

Target (issue 4): the 5,712-image set ingests in well under a minute on 2 cores. Writes
``benchmarks/results/ingest.json`` and prints a summary.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, SHARED_TRAINING, write_json
from components.ingest import ingest_dataset

TARGET_SECONDS = 60.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_TRAINING)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "ingest.json")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no data at {args.data}: pass --data <class-per-folder dir>", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as out:
        started = time.perf_counter()
        report = ingest_dataset(str(args.data), Path(out))
        seconds = time.perf_counter() - started
    result = {
        "data": str(args.data),
        "cpu_count": os.cpu_count(),
        "files": report.files_seen,
        "usable_images": report.total,
        "duplicates_collapsed": len(report.duplicates),
        "label_conflicts": len(report.label_conflicts),
        "quarantined": len(report.quarantined),
        "seconds": round(seconds, 2),
        "images_per_s": round(report.files_seen / seconds, 1),
        "target_seconds": TARGET_SECONDS,
        "target_met": seconds < TARGET_SECONDS,
    }
    write_json(result, args.output)
    print(
        f"ingest: {result['files']} files in {seconds:.1f} s ({result['images_per_s']} img/s; "
        f"target < {TARGET_SECONDS:.0f} s: {'met' if result['target_met'] else 'MISSED'}); "
        f"{result['duplicates_collapsed']} duplicates, {result['quarantined']} quarantined "
        f"-> {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Ingest on the real data set, near-duplicate search included: ``make bench-ingest``.

1. The 5,712-image set ingested as the pipeline does (decode, fingerprint, near-duplicate search,
   copies collapsed, groups): seconds (target: well under a minute on 2 cores) and what it found.
2. The neighbour search alone (the faiss binary range search) on 100,000 synthetic 256-bit
   hashes with planted near pairs: seconds, and every planted pair found.
3. With ``--recall``: the hash search's recall against comparing every pair of thumbnails by
   brute force (a few minutes): the share of pairs within the neighbour threshold it finds, and
   how many of them end up in different groups (the split relies on zero).

Writes ``benchmarks/results/ingest.json`` and prints a summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, SHARED_TRAINING, write_json
from brainmri.class_folders import list_labelled_files
from brainmri.images import decode_image
from components.config import NearDuplicateThresholds
from components.ingest import ingest_dataset
from components.near_duplicates import (
    HAMMING_CANDIDATES,
    HASH_BITS,
    candidate_pairs,
    connected_groups,
    fingerprint,
    near_pairs,
)

TARGET_SECONDS = 60.0
SYNTHETIC_HASHES = 100_000
PLANTED_PAIRS = 1_000


def ingest_figures(data: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as out:
        started = time.perf_counter()
        report = ingest_dataset(str(data), Path(out))
        seconds = time.perf_counter() - started
    near = {k: v for k, v in report.near_duplicates.items() if k != "samples"}
    return {
        "files": report.files_seen,
        "usable_images": report.total,
        "duplicates_collapsed": len(report.duplicates),
        "label_conflicts": len(report.label_conflicts),
        "quarantined": len(report.quarantined),
        "near_duplicates": near,
        "seconds": round(seconds, 2),
        "images_per_s": round(report.files_seen / seconds, 1),
        "target_seconds": TARGET_SECONDS,
        "target_met": seconds < TARGET_SECONDS,
    }


def synthetic_search(count: int = SYNTHETIC_HASHES) -> dict[str, Any]:
    """Random 256-bit codes, ``PLANTED_PAIRS`` of them copied with a few bits flipped."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, size=(count, HASH_BITS // 8), dtype=np.uint8)
    sources = rng.choice(count // 2, PLANTED_PAIRS, replace=False)
    targets = count // 2 + sources
    flips = np.zeros_like(codes[sources])
    for row in flips:
        row[rng.choice(HASH_BITS // 8, 6, replace=False)] = 1 << rng.integers(0, 8, 6)
    codes[targets] = codes[sources] ^ flips  # 6 bits off each
    mirrored = rng.integers(0, 256, size=codes.shape, dtype=np.uint8)
    started = time.perf_counter()
    found = candidate_pairs(codes, mirrored, HAMMING_CANDIDATES)
    seconds = time.perf_counter() - started
    found_set = {tuple(p) for p in found}
    planted = sum((int(s), int(t)) in found_set for s, t in zip(sources, targets, strict=True))
    return {
        "hashes": count,
        "bits": HASH_BITS,
        "max_bits": HAMMING_CANDIDATES,
        "seconds": round(seconds, 2),
        "candidate_pairs": len(found),
        "planted_pairs": PLANTED_PAIRS,
        "planted_found": planted,
    }


def brute_force_recall(data: Path, thresholds: NearDuplicateThresholds) -> dict[str, Any]:
    """The hash search against every pair of thumbnails compared (mirror-aware)."""
    files = [f for f in list_labelled_files(str(data)) if f.label is not None]
    prints = [fingerprint(decode_image(f.read())) for f in files]
    thumbs = torch.from_numpy(np.stack([p.thumbnail for p in prints]).astype(np.float32))
    flat, flipped = thumbs.flatten(1), thumbs.flip(2).flatten(1)
    truth = []
    for start in range(0, len(flat), 256):
        chunk = flat[start : start + 256]
        mad = torch.minimum(torch.cdist(chunk, flat, p=1), torch.cdist(chunk, flipped, p=1))
        rows, cols = torch.nonzero(mad / flat.shape[1] <= thresholds.neighbour, as_tuple=True)
        keep = rows + start < cols
        truth += list(zip((rows[keep] + start).tolist(), cols[keep].tolist(), strict=True))
    found = near_pairs(prints, thresholds)
    found_set = set(zip(found["a"], found["b"], strict=True))
    truth_array = np.array(truth, dtype=np.int64).reshape(-1, 2)
    groups = connected_groups(len(prints), found[["a", "b"]].to_numpy())
    split = int((groups[truth_array[:, 0]] != groups[truth_array[:, 1]]).sum())
    return {
        "images": len(prints),
        "true_pairs": len(truth),
        "found_pairs": len(found_set & set(truth)),
        "pair_recall": round(len(found_set & set(truth)) / max(len(truth), 1), 4),
        "true_pairs_in_different_groups": split,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED_TRAINING)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "ingest.json")
    parser.add_argument("--recall", action="store_true", help="also brute-force recall (minutes)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no data at {args.data}: pass --data <class-per-folder dir>", file=sys.stderr)
        return 2
    result: dict[str, Any] = {"data": str(args.data), "cpu_count": os.cpu_count()}
    result["ingest"] = ingest_figures(args.data)
    result["synthetic_search"] = synthetic_search()
    if args.recall:
        result["recall"] = brute_force_recall(args.data, NearDuplicateThresholds())
    write_json(result, args.output)
    ingest, search = result["ingest"], result["synthetic_search"]
    near = ingest["near_duplicates"]
    print(
        f"ingest: {ingest['files']} files in {ingest['seconds']:.1f} s (target < "
        f"{TARGET_SECONDS:.0f} s: {'met' if ingest['target_met'] else 'MISSED'}); "
        f"{near['identical_collapsed']} identical and {near['copies_collapsed']} near copies "
        f"collapsed, {near['label_conflicts']} label conflicts, {near['groups']} groups of "
        f"{near['images_in_groups']} images -> {ingest['usable_images']} images"
    )
    print(
        f"search: {search['hashes']} hashes in {search['seconds']} s, "
        f"{search['planted_found']}/{search['planted_pairs']} planted pairs found"
    )
    if "recall" in result:
        recall = result["recall"]
        print(
            f"recall: {recall['pair_recall']:.4f} of {recall['true_pairs']} pairs within the "
            f"neighbour threshold; {recall['true_pairs_in_different_groups']} in different groups"
        )
    print(f"-> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

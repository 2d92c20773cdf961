"""Memory allocators for the training step, each in its own process: ``make bench-allocator``.

    python -m benchmarks.bench_allocator [--lever "native padding + bf16 autocast"] [--rounds 4]

A training step allocates and frees activation buffers of tens of MB per layer. glibc's malloc
serves buffers over its mmap threshold (at most 32 MB) with fresh ``mmap`` calls and returns
them on free, so every step faults them in again, page by page: the churn behind the hundreds
of millions of minor page faults of a CPU training run. jemalloc and tcmalloc keep freed memory
for reuse. An allocator is chosen per process (``LD_PRELOAD``), so each round runs
:mod:`benchmarks.bench_step` once per allocator, in alternating order, each in a fresh process
timing one lever; the figure is each allocator's median images/s and minor faults per step, and
its median ratio to glibc within a round. glibc itself can back its large buffers with
transparent huge pages (``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, glibc 2.35+; the kernel's THP
mode must allow ``madvise``). Writes ``benchmarks/results/allocators.json``.
Needs Debian's ``libjemalloc2`` and ``libtcmalloc-minimal4`` (``--allocators`` picks fewer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from benchmarks import bench_step
from benchmarks.common import RESULTS_DIR, rate_summary, write_json
from brainmri.cpu import TCMALLOC
from components.config import TrainConfig

# allocator -> the environment that selects it for a new process
ALLOCATORS: dict[str, dict[str, str]] = {
    "glibc": {},
    # glibc's own malloc on transparent huge pages (madvise): 2 MB pages, 512x fewer faults each
    "glibc-thp": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
    "jemalloc": {"LD_PRELOAD": "libjemalloc.so.2"},
    # as PyTorch's CPU performance guide tunes it: freed pages are kept, not given back
    "jemalloc-retain": {
        "LD_PRELOAD": "libjemalloc.so.2",
        "MALLOC_CONF": "oversize_threshold:1,background_thread:true,metadata_thp:auto,"
        "dirty_decay_ms:-1,muzzy_decay_ms:-1",
    },
    "tcmalloc": {"LD_PRELOAD": TCMALLOC},
}
DEBIAN_PACKAGES = {"jemalloc": "libjemalloc2", "tcmalloc": "libtcmalloc-minimal4"}
REFERENCE = "glibc"
ENVIRONMENT = {name for env in ALLOCATORS.values() for name in env}  # cleared for each child


def child_environment(allocator: str) -> dict[str, str]:
    """This process's environment with ``allocator`` selected instead of any other."""
    return {k: v for k, v in os.environ.items() if k not in ENVIRONMENT} | ALLOCATORS[allocator]


def refuse_unloaded(allocator: str, loaded: str) -> None:
    """Stop when a child ran on ``loaded`` instead of ``allocator`` (the loader only warns)."""
    family = allocator.split("-")[0]
    if loaded != family:
        raise SystemExit(
            f"{ALLOCATORS[allocator]['LD_PRELOAD']} did not load (the child ran on {loaded}): "
            f"apt-get install {DEBIAN_PACKAGES[family]}, or leave {allocator} out"
        )


def run_in_process(allocator: str, args: argparse.Namespace, out: Path) -> dict:
    """One ``bench_step`` round of ``args.lever`` in a fresh process running ``allocator``: its
    lever figures. Refuses when the library did not load."""
    command = [sys.executable, "-m", "benchmarks.bench_step", "--levers", args.lever]
    command += ["--no-baseline", "--rounds", "1", "--steps", str(args.steps)]
    command += ["--image-size", str(args.image_size), "--batch-size", str(args.batch_size)]
    subprocess.run(
        [*command, "--out", str(out)],
        check=True,
        env=child_environment(allocator),
        stdout=subprocess.DEVNULL,
    )
    result = json.loads(out.read_text())
    refuse_unloaded(allocator, result["setup"]["allocator"])
    return result["levers"][args.lever]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_allocator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--lever", choices=list(bench_step.LEVERS), default="native padding + bf16 autocast"
    )
    parser.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS), default=None)
    parser.add_argument(
        "--image-size", type=int, default=TrainConfig().image_size, help="default: the recipe's"
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "allocators.json")
    args = parser.parse_args(argv)
    allocators = [REFERENCE, *(a for a in args.allocators or ALLOCATORS if a != REFERENCE)]
    rates: dict[str, list[float]] = {name: [] for name in allocators}
    faults: dict[str, list[float]] = {name: [] for name in allocators}
    with tempfile.TemporaryDirectory() as scratch:
        for round_number in range(args.rounds):
            order = allocators if round_number % 2 == 0 else allocators[::-1]
            for name in order:
                figures = run_in_process(name, args, Path(scratch) / f"{name}.json")
                rates[name].append(figures["images_per_s_median"])
                faults[name].append(figures["minor_faults_per_step_median"])
            print(
                f"round {round_number}: "
                + ", ".join(
                    f"{n} {r[-1]:.1f} img/s {faults[n][-1]:,.0f} faults" for n, r in rates.items()
                ),
                flush=True,
            )
    result = {
        "benchmark": "allocators",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "setup": {k: v for k, v in vars(args).items() if k != "out"} | {"reference": REFERENCE},
        "allocators": {
            name: {"environment": ALLOCATORS[name]}
            | rate_summary(values, rates[REFERENCE], "ratio_to_glibc_median")
            | {"minor_faults_per_step_median": statistics.median(faults[name])}
            for name, values in rates.items()
        },
    }
    write_json(result, args.out)
    for name, figures in result["allocators"].items():
        print(
            f"{name:9s} {figures['images_per_s_median']:.1f} img/s, "
            f"{figures['ratio_to_glibc_median']:.2f}x glibc, "
            f"{figures['minor_faults_per_step_median']:,.0f} minor faults a step"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

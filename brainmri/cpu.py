"""The CPU budget of this process: how many threads training, evaluation and serving size by.

``torch.get_num_threads()`` and ``os.cpu_count()`` see every core of the node, which
oversubscribes a pod limited to a few CPUs. The budget is the process's CPU affinity, capped by
the cgroup v2 CPU quota (``/sys/fs/cgroup/cpu.max``), rounded **down** (at least 1): a pod with
1.5 CPUs gets one thread. Rounding up would keep more threads busy than the quota pays for, and
the kernel then throttles all of them for the rest of each scheduling period, stalls that hit
latency (health probes, request handling) much harder than the half CPU left unused.
"""

from __future__ import annotations

import os
from pathlib import Path

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"


def cpu_budget(cgroup_cpu_max: Path | None = None) -> int:
    """CPUs this process may keep busy: its affinity, capped by the cgroup quota (floor, >= 1)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        available = os.cpu_count() or 1
    try:
        quota, period = (cgroup_cpu_max or CGROUP_CPU_MAX).read_text().split()[:2]
        if quota != "max":
            available = min(available, int(quota) // int(period))
    except (OSError, ValueError):
        pass
    return max(1, available)


def cpu_has_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX-512-BF16 or AMX): only then does bf16
    autocast pay on a CPU; elsewhere it is emulated and slower than fp32."""
    import torch  # here, so the CPU budget stays importable without the ML stack

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


MALLOCS = ("jemalloc", "tcmalloc")  # the allocators a process may be started on (LD_PRELOAD)
# what training runs on (the component image's LD_PRELOAD, `make run`/`make test`), Debian's
# libtcmalloc-minimal4: 1.10x glibc's images/s (benchmarks/results/allocators.json)
TCMALLOC = "libtcmalloc_minimal.so.4"


def loaded_allocator(maps: Path = Path("/proc/self/maps")) -> str:
    """The malloc this process runs on: ``jemalloc`` or ``tcmalloc`` when one is preloaded
    (``LD_PRELOAD``), else ``glibc``."""
    text = maps.read_text() if maps.exists() else ""
    return next((name for name in MALLOCS if f"lib{name}" in text), "glibc")

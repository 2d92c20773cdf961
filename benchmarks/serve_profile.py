"""What bounds the model server: its CPU time split into decode, preprocessing, forward, trust,
the protocol, HTTP and KServe, from ``py-spy`` samples of the running server.

The server is started under ``py-spy record`` (a child of py-spy: attaching to a running process
needs ptrace rights a container seldom has), driven, then stopped with SIGINT so that py-spy
writes its samples. Two recordings answer two questions: without ``--gil``, every thread's busy
samples (the CPU cores each part uses); with ``--gil``, only the thread holding the GIL (how much
of the time one Python thread at a time was the limit).
"""

from __future__ import annotations

import shutil
import sys
from collections import Counter
from pathlib import Path

# (category, substrings of a frame "function (file:line)"), first match from the innermost frame
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("forward (runtime)", ("brainmri/runtimes.py", "openvino", "onnxruntime", "torch/nn/")),
    ("trust (calibration, sets, OOD)", ("brainmri/trust.py",)),
    ("decode", ("decode_image", "PIL/")),
    ("preprocess (resize, normalise)", ("brainmri/images.py", "torchvision/")),
    ("protocol (JSON, base64, answers)", ("serving/protocol.py", "json/", "base64", "orjson")),
    ("batching", ("serving/batching.py",)),
    ("HTTP (uvicorn, starlette, fastapi)", ("uvicorn/", "h11/", "httptools", "starlette/")),
    ("KServe and admission", ("kserve/", "fastapi/", "serving/limits.py", "serving/surface.py")),
    ("metrics", ("prometheus_client",)),
    ("event loop", ("asyncio/", "uvloop")),
    ("threads", ("concurrent/futures", "threading.py")),
)
SAMPLES_PER_S = 200  # what py-spy records at, and what the counts are divided by
STARTUP = ("_find_and_load", "BrainMRIModel.load", "load (serving/predictor.py")
# innermost frames that wait rather than compute (py-spy's idle detection misses these here):
# the event loop in select, a pool thread waiting for work, a lock or condition wait
WAITING = ("selectors.py", "_worker (", "threading.py", "queue.py")


def py_spy() -> str | None:
    """The py-spy executable (this environment's first), or None where it is not installed."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.is_file() else shutil.which("py-spy")


def record_command(output: Path, gil: bool) -> list[str]:
    """The ``py-spy record`` prefix that samples the command after it into ``output`` (raw)."""
    command = [py_spy() or "py-spy", "record", "--format", "raw", "--rate", str(SAMPLES_PER_S)]
    command += ["--output", str(output), "--nonblocking"]
    return [*command, "--gil", "--"] if gil else [*command, "--"]


def categorise(stack: str) -> str | None:
    """The category of one sampled stack (frames outermost first, ``;``-separated), None for
    the server's start-up (imports, loading the bundle), which the load does not measure, and
    for a thread that waits (:data:`WAITING`)."""
    frames = stack.split(";")
    if any(marker in frame for frame in frames for marker in STARTUP):
        return None
    if any(marker in frames[-1] for marker in WAITING):
        return None
    for frame in reversed(frames):
        for category, markers in CATEGORIES:
            if any(marker in frame for marker in markers):
                return category
    return "other"


def summarise(raw: Path, seconds: float) -> dict[str, float]:
    """CPU cores per category over ``seconds`` of load, from py-spy's raw (collapsed) output."""
    counts: Counter[str] = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        category = categorise(stack) if stack else None
        if category and count.isdigit():
            counts[category] += int(count)
    cores = {name: n / SAMPLES_PER_S / seconds for name, n in counts.most_common()}
    return {name: round(value, 3) for name, value in cores.items() if value >= 0.0005}

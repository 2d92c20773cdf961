"""A readable console for a ``kfp.local`` run: one line per step (name, status, duration, key
output) and a tqdm bar while a step reports progress; each step's full log goes to
``<log_dir>/<step>.log``, and a failing step's path and last lines are printed.

``kfp.local`` writes its own log lines and every task's output through ``sys.stdout`` (the tasks'
tqdm refreshes arrive as lines of their own), so :class:`StepConsole` stands in for it during the
run (:func:`quiet_console`).
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TextIO

from tqdm import tqdm

ANSI = re.compile(r"\x1b\[[0-9;]*m")
STARTED = re.compile(r"Executing task '(?P<step>[^']+)'")
FINISHED = re.compile(r"Task '(?P<step>[^']+)' finished with status (?P<status>[A-Z]+)")
# a tqdm refresh: "<desc>:  42%|####      | 127/300 [...]"
PROGRESS = re.compile(r"^(?P<desc>[^|]*?):?\s+\d+%\|[^|]*\|\s*(?P<done>\d+)/(?P<total>\d+)")
FAILURE_LINES = 15


class StepConsole(io.TextIOBase):
    """What ``kfp.local`` prints, sorted: step lines to ``terminal``, everything to the logs.
    ``key_output(step)`` is what the step's line shows after its duration."""

    def __init__(
        self, terminal: TextIO, log_dir: Path, key_output: Callable[[str], str] | None = None
    ) -> None:
        self.terminal, self.log_dir = terminal, Path(log_dir)
        self.key_output = key_output or (lambda step: "")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.run_log: IO[str] = (self.log_dir / "run.log").open("w")
        self.step: str | None = None
        self.step_log: IO[str] | None = None
        self.started = 0.0
        self.bar: tqdm | None = None
        self.failed: list[Path] = []
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._line(ANSI.sub("", line).rstrip("\r"))
        return len(text)

    def _line(self, line: str) -> None:
        self.run_log.write(line + "\n")
        if found := STARTED.search(line):
            self._start(found["step"])
        elif found := FINISHED.search(line):
            self._finish(found["step"], found["status"])
        elif self.step_log is not None:
            self.step_log.write(line + "\n")
            if found := PROGRESS.search(line):
                self._progress(found["desc"].strip(), int(found["done"]), int(found["total"]))

    def _start(self, step: str) -> None:
        self.step, self.started = step, time.monotonic()
        self.step_log = self.log_path(step).open("w")

    def _progress(self, desc: str, done: int, total: int) -> None:
        if self.bar is None or self.bar.total != total or self.bar.desc != f"  {desc}":
            self._close_bar()
            self.bar = tqdm(total=total, desc=f"  {desc}", file=self.terminal, leave=False)
        self.bar.n = done
        self.bar.refresh()

    def _finish(self, step: str, status: str) -> None:
        self._close_bar()
        if self.step_log is not None:
            self.step_log.close()
        seconds = time.monotonic() - self.started
        key = self.key_output(step) if status == "SUCCESS" else ""
        mark = "ok" if status == "SUCCESS" else "!!"
        print(f"{mark} {step:<10} {status:<8} {seconds:6.1f} s  {key}".rstrip(), file=self.terminal)
        if status != "SUCCESS":
            path = self.log_path(step)
            self.failed.append(path)
            tail = path.read_text().splitlines()[-FAILURE_LINES:]
            print(f"   its log: {path}; the last lines:", file=self.terminal)
            print("\n".join(f"   | {line}" for line in tail), file=self.terminal)
        self.step, self.step_log = None, None
        self.terminal.flush()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log_path(self, step: str) -> Path:
        return self.log_dir / f"{step}.log"

    def close(self) -> None:
        if self._pending:
            self._line(ANSI.sub("", self._pending))
            self._pending = ""
        self._close_bar()
        for log in (self.step_log, self.run_log):
            if log is not None and not log.closed:
                log.close()
        super().close()


@contextlib.contextmanager
def quiet_console(
    terminal: TextIO, log_dir: Path, key_output: Callable[[str], str] | None = None
) -> Iterator[StepConsole]:
    """``sys.stdout`` as a :class:`StepConsole` for the duration."""
    console = StepConsole(terminal, log_dir, key_output)
    try:
        with contextlib.redirect_stdout(console):
            yield console
    finally:
        console.close()

"""The readable console of ``make run``: one line per kfp.local step with its key output, each
step's lines in its own log, a tqdm refresh turned into a bar, and a failing step's log path and
last lines on the console."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pipelines.console import quiet_console

pytestmark = pytest.mark.unit
CYAN, GREEN, RED, RESET = "\x1b[96m", "\x1b[92m", "\x1b[91m", "\x1b[0m"


def task(name: str, status: str, colour: str, lines: list[str]) -> str:
    """What kfp.local prints for one task (its log lines are coloured)."""
    return "".join(
        [
            f"06:58:34.1 - INFO - Executing task {CYAN}'{name}'{RESET}\n",
            *(line + "\n" for line in lines),
            f"06:58:39.7 - INFO - Task {CYAN}'{name}'{RESET} finished with status "
            f"{colour}{status}{RESET}\n",
        ]
    )


def test_steps_become_one_line_each_and_their_output_goes_to_their_logs(tmp_path: Path) -> None:
    terminal = io.StringIO()
    with quiet_console(terminal, tmp_path, lambda step: f"{step} said this") as console:
        print(task("ingest", "SUCCESS", GREEN, ['{"parameterValues": {}}', "ingest: 50%|##| 1/2"]))
        print(task("train", "FAILURE", RED, [f"line {i}" for i in range(30)]), end="")
    shown = terminal.getvalue()
    assert "ok ingest     SUCCESS" in shown and "ingest said this" in shown
    assert "parameterValues" not in shown  # the executor JSON stays in the log
    assert '{"parameterValues": {}}' in (tmp_path / "ingest.log").read_text()
    assert "!! train      FAILURE" in shown and "train said this" not in shown
    assert f"its log: {tmp_path / 'train.log'}" in shown
    assert "   | line 29" in shown and "   | line 14" not in shown  # its last 15 lines
    assert console.failed == [tmp_path / "train.log"]
    assert "Executing task 'train'" in (tmp_path / "run.log").read_text()  # all, uncoloured

"""The HTML run report: every figure drawn and embedded (confusion matrix, ROC per class,
reliability diagram, training curves, class balance, sample answers, worst mistakes), and
every one of them loaded by a real browser (headless Chromium; skipped, saying why, where it is
not installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from components.config import TrainConfig
from components.evaluate import evaluate_model
from components.html_report import render_html
from components.split import load_split
from components.train import TrainRun, train_model

FIGURES = ("confusion", "roc", "reliability", "training", "balance")
# appended by the test only: after the page has loaded, count the images the browser drew
LOAD_CHECK = """<script>window.addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.drawn = images.filter(i => i.complete && i.naturalWidth > 0).length;
});</script>"""


@pytest.fixture(scope="module")
def report(prepared: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for 3 epochs on the demo set, evaluated, its page written."""
    dataset, split_csv = prepared
    out = tmp_path_factory.mktemp("html-report")
    config = TrainConfig(backbone="tiny_cnn", image_size=32, batch_size=16, epochs=3)
    train_model(TrainRun(dataset, split_csv, out / "model", config), False)
    evaluation = evaluate_model(out / "model", dataset, split_csv)
    page = out / "report.html"
    page.write_text(render_html(evaluation, load_split(split_csv)))
    return page


def test_the_report_embeds_every_figure(report: Path) -> None:
    text = report.read_text()
    for name in FIGURES:
        assert f'<figure id="{name}"><img' in text, name
    assert re.search(r'<figure id="sample-0"><img', text)  # right answers, with heatmaps
    assert "Worst mistakes" in text and "accuracy" in text
    assert 'src="http' not in text and "<link" not in text  # self-contained: nothing fetched


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip(
            "chromium is not installed (make test installs it as root: apt-get install chromium)"
        )
    return found


def test_a_browser_draws_every_figure(report: Path, tmp_path: Path) -> None:
    browser = chromium()
    checked = tmp_path / "checked.html"
    checked.write_text(report.read_text().replace("</body>", LOAD_CHECK + "</body>"))
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    command += [f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000"]
    done = subprocess.run(
        [*command, "--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    images = re.search(r'data-images="(\d+)"', done.stdout)
    drawn = re.search(r'data-drawn="(\d+)"', done.stdout)
    assert images and drawn, done.stdout[-2000:]
    assert int(images.group(1)) >= len(FIGURES) + 1
    assert drawn.group(1) == images.group(1)  # every image decoded and drawn

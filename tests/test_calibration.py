"""Calibration scores, reliability bins and the reliability diagram on synthetic predictions."""

from __future__ import annotations

import importlib
import io
import sys
from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.classification import MulticlassCalibrationError

import components
from components.calibration import (
    ECE_BINS,
    CalibrationScores,
    calibration_scores,
    reliability_bins,
    reliability_diagram_png,
)

pytestmark = pytest.mark.unit

CLASSES = 4


def predictions(
    confidence: np.ndarray, correct: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose top-1 probability is ``confidence`` (>= 1/CLASSES), right where ``correct``."""
    n = len(confidence)
    predicted = rng.integers(CLASSES, size=n)
    proba = np.repeat(((1 - confidence) / (CLASSES - 1))[:, None], CLASSES, axis=1)
    proba[np.arange(n), predicted] = confidence
    wrong = (predicted + rng.integers(1, CLASSES, size=n)) % CLASSES
    return proba, np.where(correct, predicted, wrong)


def torchmetrics_ece(proba: np.ndarray, truth: np.ndarray) -> float:
    metric = MulticlassCalibrationError(num_classes=proba.shape[1], n_bins=ECE_BINS, norm="l1")
    return float(metric(torch.as_tensor(proba, dtype=torch.float32), torch.as_tensor(truth)))


def weighted_gap(proba: np.ndarray, truth: np.ndarray) -> float:
    binned = reliability_bins(proba, truth)
    return sum(b.count * abs(b.accuracy - b.confidence) for b in binned) / len(truth)


def test_a_calibrated_model_has_a_small_ece() -> None:
    rng = np.random.default_rng(0)
    confidence = rng.uniform(1 / CLASSES, 1, size=100_000)
    proba, truth = predictions(confidence, rng.random(len(confidence)) < confidence, rng)
    assert calibration_scores(proba, truth).ece < 0.02


def test_an_overconfident_model_has_its_gap_as_ece() -> None:
    rng = np.random.default_rng(1)
    proba, truth = predictions(np.full(1000, 0.99), np.arange(1000) < 700, rng)
    assert calibration_scores(proba, truth).ece == pytest.approx(0.29, abs=1e-4)  # float32 sums


@pytest.mark.parametrize("seed", range(3))
def test_the_bins_weighted_gap_is_torchmetrics_ece(seed: int) -> None:
    rng = np.random.default_rng(seed)
    proba = rng.dirichlet(np.full(CLASSES, 0.3), size=2000)
    truth = rng.integers(CLASSES, size=2000)
    assert weighted_gap(proba, truth) == pytest.approx(torchmetrics_ece(proba, truth), abs=1e-6)
    assert calibration_scores(proba, truth).ece == pytest.approx(weighted_gap(proba, truth))


def test_a_saturated_confidence_falls_in_the_last_bin() -> None:
    """Confidence 1.0 (here also 1 - 1e-9, 1.0 in float32) is in [14/15, 1], with ECE to match."""
    proba = np.array([[0.95, 0.05, 0, 0], [1, 0, 0, 0], [1 - 1e-9, 1e-9, 0, 0], [0.5, 0.5, 0, 0]])
    truth = np.array([0, 1, 0, 0])
    *_, last = reliability_bins(proba, truth)
    assert (last.low, last.high, last.count) == (pytest.approx(14 / 15), 1.0, 3)
    assert calibration_scores(proba, truth).ece == pytest.approx(weighted_gap(proba, truth))


def test_bins_partition_the_images_and_skip_empty_ones() -> None:
    proba = np.array([[0.28, 0.28, 0.22, 0.22], [0.91, 0.09, 0, 0], [0.93, 0.07, 0, 0]])
    binned = reliability_bins(proba, np.array([0, 0, 1]), bins=10)
    assert [(b.low, b.high, b.count) for b in binned] == [(0.2, 0.3, 1), (0.9, 1.0, 2)]
    assert (binned[1].confidence, binned[1].accuracy) == (pytest.approx(0.92), 0.5)


def test_nll_is_the_mean_log_loss_of_the_true_class_with_a_class_absent() -> None:
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    scores = calibration_scores(proba, np.array([0, 1, 0]))
    assert scores.nll == pytest.approx(-np.mean(np.log([0.7, 0.8, 0.2])))


def test_a_zero_probability_of_the_true_class_gives_a_finite_nll() -> None:
    assert np.isfinite(calibration_scores(np.array([[0.0, 1.0]]), np.array([0])).nll)


@pytest.mark.parametrize(
    ("proba", "truth", "brier"),
    [
        (np.eye(CLASSES), np.arange(CLASSES), 0.0),
        (np.full((1, 4), 0.25), np.array([0]), 0.75),
        (np.array([[0.8, 0.2]]), np.array([0]), 0.08),  # two classes: not halved
    ],
)
def test_brier_sums_the_squared_errors_over_classes(
    proba: np.ndarray, truth: np.ndarray, brier: float
) -> None:
    assert calibration_scores(proba, truth).brier == pytest.approx(brier)


def test_scores_serialise_by_name() -> None:
    assert CalibrationScores(ece=0.1, nll=0.2, brier=0.3).to_dict() == {
        "ece": 0.1,
        "nll": 0.2,
        "brier": 0.3,
    }


def test_the_diagram_is_a_png() -> None:
    rng = np.random.default_rng(2)
    confidence = rng.uniform(1 / CLASSES, 1, size=500)
    raw = predictions(confidence, rng.random(500) < confidence**2, rng)
    png = reliability_diagram_png({"before": raw, "after": (raw[0] ** 0.5, raw[1])})
    assert png.startswith(b"\x89PNG")
    assert Image.open(io.BytesIO(png)).size == (500, 500)


@pytest.mark.parametrize(
    "call",
    [
        lambda: calibration_scores(np.empty((0, CLASSES)), np.empty(0, dtype=int)),
        lambda: reliability_bins(np.empty((0, CLASSES)), np.empty(0, dtype=int)),
        lambda: reliability_diagram_png({"x": (np.empty((0, CLASSES)), np.empty(0, dtype=int))}),
        lambda: reliability_diagram_png({}),
        lambda: calibration_scores(np.full((2, CLASSES), 0.25), np.zeros(3, dtype=int)),
    ],
)
def test_empty_or_mismatched_input_is_refused(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


def test_the_module_imports_without_matplotlib_or_torchmetrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Neither is imported until needed (torchmetrics pulls in pyplot): blocking both, the
    module still imports, in-process so it stays a unit test."""
    for name in [*sys.modules, "matplotlib", "torchmetrics"]:
        if name.split(".")[0] in {"matplotlib", "torchmetrics"}:
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setattr(components, "calibration", sys.modules["components.calibration"])
    monkeypatch.delitem(sys.modules, "components.calibration")
    assert importlib.import_module("components.calibration").ECE_BINS == ECE_BINS

"""Calibration: how well a model's class probabilities match how often it is right.

:func:`calibration_scores` gives the expected calibration error of the top-1 confidence
(torchmetrics), the negative log-likelihood and the multiclass Brier score (scikit-learn);
:func:`reliability_bins` gives the equal-width bins that ECE averages over and
:func:`reliability_diagram_png` draws them. torchmetrics and matplotlib are imported only when
needed: torchmetrics imports ``matplotlib.pyplot`` (and takes seconds) whenever matplotlib is
installed, which a module that only defines these should not cost its importers.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
from sklearn.metrics import brier_score_loss, log_loss

ECE_BINS = 15
# torchmetrics counts a confidence of exactly 1.0 (a saturated float32 softmax) in a hidden extra
# bin rather than the last one (Lightning-AI/torchmetrics#3510); capping confidences one float32
# step below 1.0 puts it in the last bin, as reliability_bins does, and moves ECE by < 1e-7.
_BELOW_ONE = float(np.nextafter(np.float32(1), np.float32(0)))


@dataclass(frozen=True)
class CalibrationScores:
    """Calibration of a set of predictions; lower is better for all three."""

    ece: float  # expected calibration error of the top-1 confidence, ECE_BINS bins, L1
    nll: float  # mean negative log-likelihood of the true class
    brier: float  # mean over images of sum_k (p_k - y_k)^2, in [0, 2]

    def to_dict(self) -> dict[str, float]:
        """The scores by name, for JSON or metric logging."""
        return asdict(self)


@dataclass(frozen=True)
class ReliabilityBin:
    """The images whose top-1 confidence falls in ``[low, high)`` (the last bin is closed)."""

    low: float
    high: float
    count: int
    confidence: float  # mean top-1 confidence
    accuracy: float  # share of them whose top-1 class is the true one


def _as_tensors(proba: np.ndarray, truth: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate the inputs; return them as the float32 and int64 tensors torchmetrics scores."""
    proba, truth = np.asarray(proba), np.asarray(truth)
    if proba.ndim != 2 or proba.shape[1] < 2 or truth.shape != proba.shape[:1]:
        raise ValueError(
            f"expected proba (N, C) with C >= 2 and truth (N,), got {proba.shape} and {truth.shape}"
        )
    if len(proba) == 0:
        raise ValueError("cannot score calibration of no images: proba and truth are empty")
    return torch.as_tensor(proba, dtype=torch.float32), torch.as_tensor(truth, dtype=torch.long)


def _ece(probs: torch.Tensor, target: torch.Tensor) -> float:
    """torchmetrics' L1 expected calibration error over ECE_BINS equal-width bins."""
    from torchmetrics.classification import MulticlassCalibrationError

    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=ECE_BINS, norm="l1")
    return float(metric(probs.clamp(max=_BELOW_ONE), target))


def calibration_scores(proba: np.ndarray, truth: np.ndarray) -> CalibrationScores:
    """Score ``proba`` (N, C), rows summing to 1, against ``truth`` (N,) class indices.

    Classes absent from ``truth`` are fine; scikit-learn clips probabilities to
    ``[eps, 1 - eps]`` of their dtype, so a zero probability of the true class gives a large
    but finite NLL.
    """
    probs, target = _as_tensors(proba, truth)
    labels = list(range(probs.shape[1]))
    return CalibrationScores(
        ece=_ece(probs, target),
        nll=float(log_loss(truth, proba, labels=labels)),
        brier=float(brier_score_loss(truth, proba, labels=labels, scale_by_half=False)),
    )


def reliability_bins(
    proba: np.ndarray, truth: np.ndarray, bins: int = ECE_BINS
) -> list[ReliabilityBin]:
    """Equal-width bins over top-1 confidence, the last closed at 1.0; empty bins omitted.

    With the default ``bins`` their count-weighted mean ``|accuracy - confidence|`` is
    :func:`calibration_scores`' ECE: the confidences are binned in float32 on torch's
    boundaries, exactly as torchmetrics bins them.
    """
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    probs, target = _as_tensors(proba, truth)
    confidence, predicted = probs.max(dim=1)
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    index = (torch.bucketize(confidence, edges, right=True) - 1).clamp(0, bins - 1).numpy()
    counts = np.bincount(index, minlength=bins)
    confidences = np.bincount(index, weights=confidence.double().numpy(), minlength=bins)
    hits = np.bincount(index, weights=(predicted == target).double().numpy(), minlength=bins)
    return [
        ReliabilityBin(
            low=i / bins,
            high=(i + 1) / bins,
            count=int(counts[i]),
            confidence=float(confidences[i] / counts[i]),
            accuracy=float(hits[i] / counts[i]),
        )
        for i in np.flatnonzero(counts)
    ]


def reliability_diagram_png(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "Reliability"
) -> bytes:
    """A 500x500 PNG reliability diagram of named ``(proba, truth)`` pairs.

    Accuracy against mean confidence per non-empty bin for each curve, its ECE in the legend,
    the diagonal of perfect calibration, and under it the confidence histogram of the first
    curve. Draws on a bare Agg :class:`~matplotlib.figure.Figure`: no pyplot state, no display,
    safe from several threads.
    """
    if not curves:
        raise ValueError("no curves to draw")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(2, 1, height_ratios=(4, 1))
    diagram = figure.add_subplot(grid[0])
    histogram = figure.add_subplot(grid[1], sharex=diagram)
    diagram.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    for position, (name, (proba, truth)) in enumerate(curves.items()):
        binned = reliability_bins(proba, truth)
        ece = _ece(*_as_tensors(proba, truth))
        (line,) = diagram.plot(
            [b.confidence for b in binned],
            [b.accuracy for b in binned],
            marker="o",
            label=f"{name} (ECE {100 * ece:.1f} %)",
        )
        if position == 0:
            histogram.bar(
                [b.low for b in binned],
                [b.count for b in binned],
                width=[b.high - b.low for b in binned],
                align="edge",
                color=line.get_color(),
                edgecolor="white",
            )
            histogram.set_ylabel(f"images ({name})")
    diagram.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    diagram.tick_params(labelbottom=False)
    diagram.legend(loc="upper left", fontsize="small")
    histogram.set_xlabel("confidence")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()

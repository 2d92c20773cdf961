"""The uncertainty of the figures: confidence intervals of accuracies and the paired test that
compares two models on the same images (scipy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000


def wilson_interval(correct: int, total: int) -> tuple[float, float] | None:
    """The Wilson 95 % interval of a proportion ``correct / total`` (None when total is 0)."""
    if total == 0:
        return None
    interval = binomtest(int(correct), int(total)).proportion_ci(CONFIDENCE, method="wilson")
    return float(interval.low), float(interval.high)


def balanced_accuracy_interval(
    truth: np.ndarray, predicted: np.ndarray, seed: int = 0
) -> tuple[float, float] | None:
    """A 95 % interval of the balanced accuracy: bootstrap resampling within each class (the
    class sizes stay as they are), percentiles of the resampled means of the recalls."""
    classes = np.unique(truth)
    if len(truth) == 0:
        return None
    rng = np.random.default_rng(seed)
    recalls = []
    for label in classes:
        right = (predicted[truth == label] == label).astype(np.float64)
        draws = rng.integers(0, len(right), size=(BOOTSTRAP_RESAMPLES, len(right)))
        recalls.append(right[draws].mean(axis=1))
    means = np.mean(recalls, axis=0)
    low, high = np.percentile(means, [100 * (1 - CONFIDENCE) / 2, 100 * (1 + CONFIDENCE) / 2])
    return float(low), float(high)


@dataclass(frozen=True)
class PairedComparison:
    """Two models on the same images: how often each is right where the other is wrong."""

    images: int
    both_right: int
    only_first_right: int  # the discordant pairs McNemar's test weighs
    only_second_right: int
    both_wrong: int

    @property
    def first_errors(self) -> int:
        return self.only_second_right + self.both_wrong

    @property
    def second_errors(self) -> int:
        return self.only_first_right + self.both_wrong

    @property
    def mcnemar_p(self) -> float:
        """Exact (binomial) two-sided McNemar p-value: 1.0 when the models never disagree."""
        discordant = self.only_first_right + self.only_second_right
        if discordant == 0:
            return 1.0
        return float(binomtest(self.only_first_right, discordant, 0.5).pvalue)


def compare_paired(first_right: np.ndarray, second_right: np.ndarray) -> PairedComparison:
    """The paired counts of two models' right/wrong answers on the same images."""
    first, second = np.asarray(first_right, bool), np.asarray(second_right, bool)
    if first.shape != second.shape:
        raise ValueError(f"paired answers differ in length: {first.shape} vs {second.shape}")
    return PairedComparison(
        images=int(first.size),
        both_right=int((first & second).sum()),
        only_first_right=int((first & ~second).sum()),
        only_second_right=int((~first & second).sum()),
        both_wrong=int((~first & ~second).sum()),
    )

"""How far an answer can be trusted: calibrated confidence, a prediction set, "uncertain", and
"not a brain MRI"; and where in the image the evidence is.

Everything here is fitted once, after training, on held-out data (:func:`fit_trust`), saved in
the model bundle (:class:`Trust`), and applied by evaluate and the server alike through
:meth:`Trust.assess` on one forward pass's :class:`Outputs`:

- **Temperature scaling** (Guo et al., 2017): the logits are divided by one temperature fitted
  on the validation split by minimising its negative log-likelihood (``scipy``), so a
  confidence of 0.9 is right about nine times in ten.
- **Split conformal prediction sets** with the LAC score, fitted by ``mapie``'s
  ``SplitConformalClassifier`` (a maintained, scikit-learn-shaped implementation with the
  finite-sample quantile; torchcp would bring transformers and torch-geometric along): a class
  is in the set when its calibrated probability is at least ``1 - q``, which holds the true
  class for ``coverage`` of images from the validation distribution. The set may be empty
  (no class is plausible enough) or hold several classes.
- **Uncertain**: the set does not hold exactly one class, or the calibrated confidence is below
  a threshold chosen on validation so that at most ``false_flag_rate`` of its right answers are
  flagged.
- **Not a brain MRI**: an out-of-distribution score from ``pytorch-ood`` (the energy of the
  logits, or the Mahalanobis distance of the penultimate features to the training classes);
  both are fitted, the one that better separates validation slices from a generated non-MRI
  probe set (:mod:`brainmri.non_mri`, another seed than the benchmark's) is kept, and its
  threshold lets at most ``false_rejection_rate`` of validation slices through as rejected.
- **Class-activation maps** (Zhou et al., 2016): with a global-average pool and a linear head,
  the head's weights over the last feature map show where the evidence for a class is; no
  gradients are needed, so it works on any runtime that returns that map (:func:`heatmaps`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

TRUST_FILE = "trust.pt"  # the OOD detector's tensors, beside model.json in a bundle
NOT_BRAIN_MRI = "not_brain_mri"  # the label of an input the detector rejects
DEFAULT_COVERAGE = 0.95
DEFAULT_FALSE_FLAG_RATE = 0.02
DEFAULT_FALSE_REJECTION_RATE = 0.01
OOD_METHODS = ("energy", "mahalanobis")
# the hottest region: the connected pixels above this fraction of the peak. A map upsampled from
# a coarse grid is broad: at half the peak its box covered several times the demo lesion (IoU
# 0.11 on the demo test split), within 80 % of it IoU 0.29
HOT_FRACTION = 0.8


@dataclass(frozen=True)
class Outputs:
    """One forward pass over a batch: what every trust figure is computed from."""

    logits: Tensor  # [V, N, C] raw logits of each view (V = 2 with test-time flip)
    features: Tensor  # [N, D] penultimate features (the pooled map), mean over the views
    maps: Tensor | None = None  # [N, D, h, w] last feature maps, mean over the views

    def __len__(self) -> int:
        return int(self.logits.shape[1])

    def probabilities(self, temperature: float = 1.0) -> Tensor:
        """[N, C]: the mean over the views of each view's softmax at ``temperature``."""
        return torch.softmax(self.logits.float() / temperature, dim=-1).mean(dim=0)

    @staticmethod
    def concat(parts: list[Outputs]) -> Outputs:
        maps = [p.maps for p in parts]
        return Outputs(
            torch.cat([p.logits for p in parts], dim=1),
            torch.cat([p.features for p in parts]),
            torch.cat(maps) if all(m is not None for m in maps) and maps else None,
        )


@dataclass
class OODDetector:
    """An out-of-distribution score (higher: less like the training slices) and the threshold
    above which an input is rejected."""

    method: str  # one of OOD_METHODS
    threshold: float = math.inf
    class_means: Tensor | None = None  # [C, D] (mahalanobis)
    precision: Tensor | None = None  # [D, D] (mahalanobis)

    def __post_init__(self) -> None:
        if self.method not in OOD_METHODS:
            raise ValueError(f"unknown OOD method {self.method!r}; choose one of {OOD_METHODS}")

    def scores(self, outputs: Outputs) -> Tensor:
        """[N] outlier scores of ``outputs``."""
        if self.method == "energy":
            from pytorch_ood.detector import EnergyBased

            return torch.stack([EnergyBased.score(v.float()) for v in outputs.logits]).mean(0)
        from pytorch_ood.detector import Mahalanobis

        detector = Mahalanobis(None)
        detector.mu, detector.precision = self.class_means, self.precision
        return detector.predict_features(outputs.features.float())

    def tensors(self) -> dict[str, Tensor]:
        return {
            name: value
            for name, value in (("class_means", self.class_means), ("precision", self.precision))
            if value is not None
        }


@dataclass
class Assessment:
    """What :meth:`Trust.assess` says of each image of a batch."""

    probabilities: Tensor  # [N, C] calibrated
    prediction_sets: Tensor  # [N, C] bool: the classes in each image's set
    uncertain: Tensor  # [N] bool
    ood_scores: Tensor  # [N] (NaN without a detector)
    not_brain_mri: Tensor  # [N] bool

    @property
    def predicted(self) -> Tensor:
        return self.probabilities.argmax(dim=1)

    @property
    def confidence(self) -> Tensor:
        return self.probabilities.max(dim=1).values

    def set_members(self, class_names: list[str]) -> list[list[str]]:
        """Each image's prediction set as class names."""
        return [
            [name for name, held in zip(class_names, row, strict=True) if held]
            for row in self.prediction_sets.tolist()
        ]


@dataclass
class Trust:
    """The fitted calibration, prediction sets, uncertainty flag and OOD detector of a model.

    The default (nothing fitted: a bundle from before this existed) calibrates nothing, gives
    each image the set of its top class, flags nothing and rejects nothing."""

    temperature: float = 1.0
    coverage: float = DEFAULT_COVERAGE
    set_quantile: float | None = None  # LAC: a class is in the set when p >= 1 - set_quantile
    confidence_threshold: float = 0.0
    false_flag_rate: float = DEFAULT_FALSE_FLAG_RATE
    ood: OODDetector | None = None
    fit_report: dict[str, Any] = field(default_factory=dict)  # what was fitted on what

    def assess(self, outputs: Outputs) -> Assessment:
        proba = outputs.probabilities(self.temperature)
        if self.set_quantile is None:
            sets = torch.zeros_like(proba, dtype=torch.bool)
            sets[torch.arange(len(proba)), proba.argmax(dim=1)] = True
        else:
            sets = prediction_sets(proba, self.set_quantile)
        uncertain = (sets.sum(dim=1) != 1) | (proba.max(dim=1).values < self.confidence_threshold)
        if self.ood is None:
            scores = torch.full((len(proba),), math.nan)
            rejected = torch.zeros(len(proba), dtype=torch.bool)
        else:
            scores = self.ood.scores(outputs).float().cpu()
            rejected = scores > self.ood.threshold
        return Assessment(proba, sets, uncertain | rejected, scores, rejected)

    # -- saving ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON part (``model.json``'s ``trust``); the detector's tensors go to
        :data:`TRUST_FILE` (:meth:`save_tensors`)."""
        values = {k: v for k, v in asdict(self).items() if k != "ood"}
        if self.ood is not None:
            values["ood"] = {"method": self.ood.method, "threshold": self.ood.threshold}
        return values

    def save_tensors(self, directory: Path) -> bool:
        """Write the detector's tensors to ``directory/trust.pt``; False when it has none."""
        tensors = self.ood.tensors() if self.ood is not None else {}
        if tensors:
            torch.save({k: v.contiguous() for k, v in tensors.items()}, directory / TRUST_FILE)
        return bool(tensors)

    @classmethod
    def from_saved(cls, values: dict[str, Any], directory: Path) -> Trust:
        values = dict(values)
        ood = values.pop("ood", None)
        trust = cls(**values)
        if ood is not None:
            path = Path(directory) / TRUST_FILE
            tensors = torch.load(path, weights_only=True) if path.is_file() else {}
            trust.ood = OODDetector(ood["method"], float(ood["threshold"]), **tensors)
        return trust


def prediction_sets(proba: Tensor, set_quantile: float) -> Tensor:
    """[N, C] bool: LAC sets, every class whose probability is at least ``1 - set_quantile``."""
    return proba >= 1 - set_quantile


# -- fitting ----------------------------------------------------------------------------------


def fit_temperature(outputs: Outputs, labels: Tensor) -> float:
    """The temperature that minimises the negative log-likelihood of ``labels`` (searched over
    [0.05, 20] on a log scale)."""
    from scipy.optimize import minimize_scalar

    index = torch.arange(len(labels))

    def nll(log_t: float) -> float:
        proba = outputs.probabilities(math.exp(log_t))[index, labels]
        return float(-torch.log(proba.clamp_min(1e-12)).mean())

    found = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(found.x))


def fit_set_quantile(proba: Tensor, labels: Tensor, coverage: float) -> float:
    """The LAC quantile ``q`` of ``mapie``'s conformity scores of ``(proba, labels)`` for
    ``coverage``: the ``ceil((n + 1) * coverage)``-th smallest, mapie's finite-sample rule (its
    sets and :func:`prediction_sets`' are tested to agree)."""
    from mapie.classification import SplitConformalClassifier

    if not 0 < coverage < 1:
        raise ValueError(f"coverage must be between 0 and 1, got {coverage}")
    given = _given_probabilities(proba.shape[1])
    conformal = SplitConformalClassifier(
        given, confidence_level=coverage, conformity_score="lac", prefit=True
    ).conformalize(proba.numpy(), labels.numpy())
    scores = np.sort(np.asarray(conformal.conformity_scores, dtype=float).ravel())
    rank = math.ceil((len(scores) + 1) * coverage)
    return float(scores[min(rank, len(scores)) - 1]) if rank <= len(scores) else 1.0


def _given_probabilities(n_classes: int) -> Any:
    """A fitted scikit-learn classifier whose input *is* its predicted probabilities: how mapie
    is fed a network's calibrated outputs without wrapping the network."""
    from sklearn.base import BaseEstimator, ClassifierMixin

    class GivenProbabilities(ClassifierMixin, BaseEstimator):
        def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> GivenProbabilities:
            self.classes_ = np.arange(n_classes)
            return self

        def predict_proba(self, X: np.ndarray) -> np.ndarray:
            return np.asarray(X)

        def predict(self, X: np.ndarray) -> np.ndarray:
            return np.asarray(X).argmax(axis=1)

    return GivenProbabilities().fit(np.zeros((1, n_classes)))


def fit_confidence_threshold(
    proba: Tensor, labels: Tensor, sets: Tensor, false_flag_rate: float
) -> float:
    """The highest confidence threshold that flags at most ``false_flag_rate`` of the right
    answers (counting those flagged already by their set); 0 when the sets alone flag more."""
    right = proba.argmax(dim=1) == labels
    confidence = proba.max(dim=1).values[right]
    by_set = (sets.sum(dim=1) != 1)[right]
    if not len(confidence):
        return 0.0
    best = 0.0
    for candidate in sorted(set(confidence.tolist())):
        if float(((confidence < candidate) | by_set).float().mean()) > false_flag_rate:
            break
        best = candidate
    return best


def fit_ood(
    method: str,
    train: Outputs,
    train_labels: Tensor,
    val: Outputs,
    false_rejection_rate: float = DEFAULT_FALSE_REJECTION_RATE,
) -> OODDetector:
    """A detector of ``method`` fitted on the training features, its threshold set so that at
    most ``false_rejection_rate`` of the validation images score above it."""
    detector = OODDetector(method)
    if method == "mahalanobis":
        from pytorch_ood.detector import Mahalanobis

        fitted = Mahalanobis(None).fit_features(train.features.double(), train_labels)
        detector.class_means, detector.precision = fitted.mu.float(), fitted.precision.float()
    scores = detector.scores(val).numpy()
    detector.threshold = float(np.quantile(scores, 1 - false_rejection_rate, method="higher"))
    return detector


def ood_metrics(detector: OODDetector, inside: Outputs, outside: Outputs) -> dict[str, float]:
    """pytorch-ood's OOD metrics of the detector on ``inside`` slices and ``outside`` (positive)
    images: AUROC, AUPR-IN/OUT, AUTC, and FPR95TPR (the share of slices scored above the
    threshold that catches 95 % of the outside images)."""
    from pytorch_ood.metrics import OODMetrics

    scores = torch.cat([detector.scores(inside), detector.scores(outside)])
    labels = torch.cat([torch.zeros(len(inside)), -torch.ones(len(outside))]).long()
    return {k: float(v) for k, v in OODMetrics().update(scores, labels).compute().items()}


def fit_trust(
    train: Outputs,
    train_labels: Tensor,
    val: Outputs,
    val_labels: Tensor,
    probe: Outputs,
    coverage: float = DEFAULT_COVERAGE,
    false_flag_rate: float = DEFAULT_FALSE_FLAG_RATE,
    false_rejection_rate: float = DEFAULT_FALSE_REJECTION_RATE,
) -> Trust:
    """Fit everything on held-out ``val`` (the OOD detector on ``train``'s features, chosen on
    ``val`` against the non-MRI ``probe``)."""
    errors = int((val.probabilities().argmax(dim=1) != val_labels).sum())
    # without a wrong answer on val the likelihood grows as the temperature falls to zero: no
    # temperature can be fitted, so none is applied
    temperature = fit_temperature(val, val_labels) if errors else 1.0
    proba = val.probabilities(temperature)
    quantile = fit_set_quantile(proba, val_labels, coverage)
    sets = prediction_sets(proba, quantile)
    threshold = fit_confidence_threshold(proba, val_labels, sets, false_flag_rate)
    detectors = {m: fit_ood(m, train, train_labels, val, false_rejection_rate) for m in OOD_METHODS}
    aurocs = {m: ood_metrics(d, val, probe)["AUROC"] for m, d in detectors.items()}
    chosen = max(OOD_METHODS, key=lambda m: (aurocs[m], m == "energy"))
    report = {
        "validation_images": len(val),
        "validation_errors": errors,
        # 1.0: too few validation images to certify the coverage; every set holds every class
        "sets_certified": quantile < 1.0,
        "training_images": len(train),
        "probe_images": len(probe),
        "probe_auroc": aurocs,
        "ood_method": chosen,
        "false_rejection_rate": false_rejection_rate,
    }
    return Trust(
        temperature, coverage, quantile, threshold, false_flag_rate, detectors[chosen], report
    )


# -- where the evidence is --------------------------------------------------------------------


def heatmaps(maps: Tensor, head_weight: Tensor, classes: Tensor, size: tuple[int, int]) -> Tensor:
    """[N, H, W] class-activation maps in [0, 1] (1: the hottest pixel) of each image's class
    ``classes[i]``, from its last feature map ``maps[i]`` and the linear head's weights."""
    weights = head_weight.float()[classes]  # [N, D]
    cams = torch.relu(torch.einsum("nd,ndhw->nhw", weights, maps.float()))
    cams = torch.nn.functional.interpolate(
        cams.unsqueeze(1), size=size, mode="bilinear", align_corners=False
    ).squeeze(1)
    peak = cams.flatten(1).max(dim=1).values.clamp_min(1e-12)
    return cams / peak.view(-1, 1, 1)


def hottest_point(heatmap: Tensor) -> tuple[int, int]:
    """(x, y) of the heatmap's maximum."""
    y, x = divmod(int(heatmap.argmax()), heatmap.shape[1])
    return x, y


def hottest_box(heatmap: Tensor, fraction: float = HOT_FRACTION) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1), end-exclusive: the bounding box of the connected region around the
    maximum where the heat is at least ``fraction`` of it."""
    from scipy import ndimage

    regions, _ = ndimage.label(heatmap.numpy() >= fraction * float(heatmap.max()))
    x, y = hottest_point(heatmap)
    ys, xs = np.nonzero(regions == regions[y, x])
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1

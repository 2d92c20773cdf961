"""How far the model's answers on a labelled set can be trusted: calibration before and after the
bundle's temperature, the prediction sets' coverage and size, and the share of right and of wrong
answers flagged ``uncertain``, overall and per class (:func:`trust_scores`); the heatmap overlays
the evaluation report shows (:func:`explained_images`); and how well a heatmap points at a lesion
whose mask is known (:func:`pointing_distance`, :func:`box_iou`)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from brainmri.model import ModelBundle
from brainmri.trust import Assessment, heatmaps, hottest_box, hottest_point
from components.calibration import CalibrationScores, calibration_scores, reliability_diagram_png

# the pointing game (Zhang et al., 2016): a hit when the hottest point lies within 15 px of the
# object on a 224 px image, i.e. within this share of the image's side
POINTING_TOLERANCE = 15 / 224
EXPLAINED_RIGHT_PER_CLASS = 2  # right answers shown with their heatmap, per class
OVERLAY_PX = 128


@dataclass(frozen=True)
class FlagRates:
    """Prediction sets and uncertainty flags on a group of images."""

    images: int
    coverage: float  # share whose prediction set holds the true class
    mean_set_size: float
    empty_sets: float  # share with an empty set (no class plausible enough)
    right_flagged: float | None  # share of the right answers flagged uncertain
    wrong_flagged: float | None  # share of the wrong answers flagged uncertain
    right: int
    wrong: int
    rejected: float  # share rejected as not a brain MRI (false rejections, on MRI slices)


@dataclass
class TrustScores:
    """Every trust figure of one model on one labelled set."""

    temperature: float
    coverage_target: float | None  # None: the bundle has no fitted sets (each is its top class)
    before: CalibrationScores  # of the raw softmax
    after: CalibrationScores  # with the temperature
    overall: FlagRates
    per_class: dict[str, FlagRates] = field(default_factory=dict)
    reliability_png: str = field(default="", repr=False)  # base64, before vs after

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.pop("reliability_png")
        return values

    def scalar_metrics(self) -> dict[str, float]:
        """Flat name -> number, for a KFP ``Metrics`` artifact."""
        scalars = {
            "ece_before": self.before.ece,
            "ece": self.after.ece,
            "nll": self.after.nll,
            "brier": self.after.brier,
            "temperature": self.temperature,
            "set_coverage": self.overall.coverage,
            "mean_set_size": self.overall.mean_set_size,
            "rejected_as_not_mri": self.overall.rejected,
        }
        for name in ("right_flagged", "wrong_flagged"):
            if getattr(self.overall, name) is not None:
                scalars[name] = getattr(self.overall, name)
        return scalars


def _flag_rates(truth: np.ndarray, assessment: Assessment, mask: np.ndarray) -> FlagRates:
    sets = assessment.prediction_sets.numpy()[mask]
    flagged = assessment.uncertain.numpy()[mask]
    right = assessment.predicted.numpy()[mask] == truth[mask]
    held = sets[np.arange(len(sets)), truth[mask]] if len(sets) else np.zeros(0, bool)
    sizes = sets.sum(axis=1)

    def share(values: np.ndarray) -> float | None:
        return float(values.mean()) if len(values) else None

    return FlagRates(
        images=int(mask.sum()),
        coverage=share(held) or 0.0,
        mean_set_size=share(sizes) or 0.0,
        empty_sets=share(sizes == 0) or 0.0,
        right_flagged=share(flagged[right]),
        wrong_flagged=share(flagged[~right]),
        right=int(right.sum()),
        wrong=int((~right).sum()),
        rejected=share(assessment.not_brain_mri.numpy()[mask]) or 0.0,
    )


def trust_scores(
    truth: np.ndarray,
    raw_proba: np.ndarray,
    assessment: Assessment,
    class_names: Sequence[str],
    temperature: float,
    coverage_target: float | None,
    diagram: bool = True,
) -> TrustScores:
    """The trust figures of ``assessment`` (the bundle's answers) against labels ``truth``;
    ``raw_proba`` are the probabilities before the temperature."""
    calibrated = assessment.probabilities.numpy()
    png = ""
    if diagram:
        curves = {"before": (raw_proba, truth), "after": (calibrated, truth)}
        title = f"Reliability (temperature {temperature:.2f})"
        png = base64.b64encode(reliability_diagram_png(curves, title)).decode("ascii")
    everything = np.ones(len(truth), dtype=bool)
    return TrustScores(
        temperature=temperature,
        coverage_target=coverage_target,
        before=calibration_scores(raw_proba, truth),
        after=calibration_scores(calibrated, truth),
        overall=_flag_rates(truth, assessment, everything),
        per_class={
            name: _flag_rates(truth, assessment, truth == k) for k, name in enumerate(class_names)
        },
        reliability_png=png,
    )


@dataclass(frozen=True)
class ExplainedImage:
    """An image shown with the heatmap of its predicted class and the hottest box."""

    path: str
    true_label: str
    predicted_label: str
    confidence: float
    correct: bool
    box: tuple[int, int, int, int]  # in the network's input pixels
    overlay_png: str = field(default="", repr=False)  # base64 PNG: image, heat and box


def overlay_png(image: torch.Tensor, heatmap: torch.Tensor, box: tuple[int, int, int, int]) -> str:
    """A base64 PNG of a uint8 (3, H, W) image under its heatmap (red: hot) with the box."""
    from PIL import ImageDraw

    grey = image.float().mean(dim=0).numpy()
    heat = heatmap.numpy()
    rgb = np.stack([grey * (1 - 0.5 * heat) + 255 * 0.5 * heat, grey * (1 - 0.5 * heat), grey])
    picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    ImageDraw.Draw(picture).rectangle([box[0], box[1], box[2] - 1, box[3] - 1], outline="yellow")
    picture.thumbnail((OVERLAY_PX, OVERLAY_PX))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def explained_images(
    bundle: ModelBundle,
    images: torch.Tensor,
    truth: np.ndarray,
    proba: np.ndarray,
    paths: Sequence[str],
    worst: Sequence[int],
    right_per_class: int = EXPLAINED_RIGHT_PER_CLASS,
) -> list[ExplainedImage]:
    """The ``worst`` mistakes (indices) and the most confident right answers of each class, each
    with the heatmap of its predicted class."""
    predicted = proba.argmax(axis=1)
    chosen = list(worst)
    for k in range(len(bundle.class_names)):
        right = np.flatnonzero((truth == k) & (predicted == k))
        chosen += right[np.argsort(-proba[right, k], kind="stable")][:right_per_class].tolist()
    if not chosen:
        return []
    outputs = bundle.forward_images(images[chosen], maps=True)
    classes = torch.as_tensor(predicted[chosen])
    maps = heatmaps(outputs.maps, bundle.head_weight, classes, tuple(images.shape[2:]))
    shown = []
    for i, heat in zip(chosen, maps, strict=True):
        box = hottest_box(heat)
        shown.append(
            ExplainedImage(
                path=paths[i],
                true_label=bundle.class_names[truth[i]],
                predicted_label=bundle.class_names[predicted[i]],
                confidence=float(proba[i, predicted[i]]),
                correct=bool(predicted[i] == truth[i]),
                box=box,
                overlay_png=overlay_png(images[i], heat, box),
            )
        )
    return shown


def pointing_distance(heatmap: torch.Tensor, mask: np.ndarray) -> float:
    """Pixels from the heatmap's hottest point to the lesion ``mask`` (0: inside it)."""
    from scipy import ndimage

    x, y = hottest_point(heatmap)
    return float(ndimage.distance_transform_edt(~np.asarray(mask, bool))[y, x])


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int] | None) -> float:
    """Intersection over union of two end-exclusive ``(x0, y0, x1, y1)`` boxes."""
    if b is None:
        return 0.0
    width = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0

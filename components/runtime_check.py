"""Does a runtime answer as eager PyTorch does? The same bundle on two runtimes over the same
labelled images: how often their labels agree, how far their probabilities are apart, and the
paired counts of their right and wrong answers (McNemar), which decide whether a quantised
network may be served; and :func:`quantise_bundle`, which adds that network to a bundle."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from brainmri.model import ModelBundle
from brainmri.runtimes import ONNX_FILE, quantize_int8
from components.statistics import PairedComparison, compare_paired

# the bars: fp32 runtimes agree on >= 99.9 % of labels within 1e-3 in probability; a
# quantised network may cost at most 0.1 point of accuracy on held-out images
LABEL_AGREEMENT = 0.999
PROBABILITY_TOLERANCE = 1e-3
QUANTISED_ACCURACY_LOSS = 0.001


@dataclass(frozen=True)
class RuntimeAgreement:
    """``candidate``'s answers against ``reference``'s on the same images."""

    reference: str
    candidate: str
    images: int
    label_agreement: float
    max_probability_difference: float
    paired: PairedComparison  # first: the reference, second: the candidate

    @property
    def accuracy_loss(self) -> float:
        """How much less often the candidate is right (negative: more often)."""
        return (self.paired.second_errors - self.paired.first_errors) / max(1, self.images)

    @property
    def equivalent(self) -> bool:
        """Within the fp32 bars: labels and probabilities as the reference's."""
        return (
            self.label_agreement >= LABEL_AGREEMENT
            and self.max_probability_difference <= PROBABILITY_TOLERANCE
        )

    @property
    def quantisation_acceptable(self) -> bool:
        """At most :data:`QUANTISED_ACCURACY_LOSS` of accuracy lost on these images."""
        return self.accuracy_loss <= QUANTISED_ACCURACY_LOSS + 1e-12

    def to_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "candidate": self.candidate,
            "images": self.images,
            "label_agreement": round(self.label_agreement, 5),
            "max_probability_difference": float(f"{self.max_probability_difference:.3g}"),
            "accuracy_loss_points": round(100 * self.accuracy_loss, 3),
            "paired": {**asdict(self.paired), "mcnemar_p": round(self.paired.mcnemar_p, 4)},
            "equivalent": self.equivalent,
        }


def compare_probabilities(
    reference: torch.Tensor,
    candidate: torch.Tensor,
    labels: torch.Tensor,
    names: tuple[str, str] = ("reference", "candidate"),
) -> RuntimeAgreement:
    """Two runtimes' class probabilities ``[N, C]`` for the same images of true ``labels``."""
    first, second = reference.argmax(dim=1), candidate.argmax(dim=1)
    return RuntimeAgreement(
        reference=names[0],
        candidate=names[1],
        images=len(labels),
        label_agreement=float((first == second).float().mean()) if len(labels) else 1.0,
        max_probability_difference=float((reference - candidate).abs().max())
        if len(labels)
        else 0.0,
        paired=compare_paired((first == labels).numpy(), (second == labels).numpy()),
    )


def compare_runtimes(
    reference: ModelBundle, candidate: ModelBundle, images: torch.Tensor, labels: torch.Tensor
) -> RuntimeAgreement:
    """One bundle on two runtimes (``reference`` usually eager PyTorch) over cached uint8
    ``images`` of true ``labels``."""
    return compare_probabilities(
        reference.forward_images(images).probabilities(reference.trust.temperature),
        candidate.forward_images(images).probabilities(candidate.trust.temperature),
        labels,
        (reference.runtime_name, candidate.runtime_name),
    )


def quantise_bundle(
    directory: Path, images: torch.Tensor, batch_size: int = 16, subset_size: int = 300
) -> Path:
    """Add to the bundle in ``directory`` its exported network quantised to INT8 (NNCF,
    calibrated on ``images``: cached uint8 training images, normalised, with their mirror
    images when the bundle averages flips, as the runtime will see them), covered by the bundle's
    checksums; the path of its ``.xml``. Serve it only if :func:`compare_runtimes` on held-out
    images finds :attr:`RuntimeAgreement.quantisation_acceptable`."""
    directory = Path(directory)
    bundle = ModelBundle.load(directory)
    normalize = bundle.preprocess.normalize()
    batches = []
    for start in range(0, len(images), batch_size):
        batch = normalize(images[start : start + batch_size])
        batches.append(torch.cat([batch, batch.flip(-1)]) if bundle.test_time_flip else batch)
    path = quantize_int8(directory / ONNX_FILE, batches, directory, subset_size)
    ModelBundle.update_metadata(directory)  # rewrites the checksums, now over the INT8 files
    return path

"""Gate: decide whether a trained model may replace production."""

from dataclasses import dataclass


@dataclass(frozen=True)
class GateDecision:
    """Whether to promote, and why."""

    promote: bool
    reason: str


def gate_decision(accuracy: float, threshold: float) -> GateDecision:
    """Promote only when the test accuracy reaches ``threshold``."""
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy={accuracy} is not a fraction in [0, 1]")
    if accuracy >= threshold:
        return GateDecision(True, f"accuracy {accuracy:.4f} >= threshold {threshold:.4f}")
    return GateDecision(False, f"accuracy {accuracy:.4f} < threshold {threshold:.4f}")

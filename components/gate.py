"""Gate: decide whether a trained model (the challenger) may replace production (the champion).

Promote only when the challenger's accuracy reaches ``threshold`` and it is not worse than the
champion by more than ``tolerance``, both scored on the same test split. The champion is the
model recorded in ``s3://<models_bucket>/<model_name>/production.json``; with none (the first
model ever) the threshold alone decides.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from brainmri.model import load_bundle
from brainmri.registry import read_production_record
from brainmri.storage import ObjectStore, StorageError
from components.evaluate import evaluate_split


@dataclass(frozen=True)
class GateDecision:
    """Whether to promote, why, and the scores the decision rests on."""

    promote: bool
    reason: str
    challenger_accuracy: float | None = None
    champion_accuracy: float | None = None  # None: no champion to compare with
    threshold: float | None = None
    tolerance: float = 0.0
    champion_version: str | None = None
    comparison: str = ""  # how the champion was found and scored

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} is not a fraction in [0, 1]")


def gate_decision(
    accuracy: float,
    threshold: float,
    champion_accuracy: float | None = None,
    tolerance: float = 0.0,
    champion_version: str | None = None,
) -> GateDecision:
    """Promote when ``accuracy >= threshold`` and ``accuracy >= champion_accuracy - tolerance``.

    ``champion_accuracy=None`` (no production model) leaves the threshold alone to decide.
    """
    _check_fraction("accuracy", accuracy)
    if champion_accuracy is not None:
        _check_fraction("champion_accuracy", champion_accuracy)
    if tolerance < 0:
        raise ValueError(f"tolerance={tolerance} must be >= 0")
    scores = {
        "challenger_accuracy": accuracy,
        "champion_accuracy": champion_accuracy,
        "threshold": threshold,
        "tolerance": tolerance,
        "champion_version": champion_version,
    }
    if accuracy < threshold:
        return GateDecision(False, f"accuracy {accuracy:.4f} < threshold {threshold:.4f}", **scores)
    passed = f"accuracy {accuracy:.4f} >= threshold {threshold:.4f}"
    if champion_accuracy is None:
        return GateDecision(True, f"{passed}; no production model to compare with", **scores)
    champion = f"production {champion_version or '?'} at {champion_accuracy:.4f}"
    if accuracy < champion_accuracy - tolerance:
        return GateDecision(
            False,
            f"{passed}, but worse than {champion} by more than tolerance {tolerance:.4f}",
            **scores,
        )
    return GateDecision(
        True, f"{passed} and not worse than {champion} (tolerance {tolerance:.4f})", **scores
    )


@dataclass(frozen=True)
class Champion:
    """The production model as recorded by the promote step."""

    version: str
    storage_uri: str
    recorded_accuracy: float | None


def fetch_champion(
    models_bucket: str, model_name: str, store: ObjectStore | None = None
) -> Champion | None:
    """The current production model, or None when nothing was ever promoted."""
    record = read_production_record(store or ObjectStore(), models_bucket, model_name)
    if not record or not record.get("storage_uri"):
        return None
    return Champion(str(record.get("version", "?")), record["storage_uri"], record.get("accuracy"))


def score_champion(
    champion: Champion,
    dataset_dir: Path,
    split_csv: Path,
    store: ObjectStore | None = None,
    split_name: str = "test",
) -> tuple[float | None, str]:
    """The champion's accuracy on the challenger's test split, and how it was obtained.

    When the champion cannot be loaded or scored, its recorded accuracy stands in (noted as
    such); when there is none either, None (the threshold alone then decides).
    """
    try:
        bundle = load_bundle(champion.storage_uri, store=store)
        evaluation = evaluate_split(bundle, Path(dataset_dir), Path(split_csv), split_name)
        return evaluation.accuracy, f"scored on the same '{split_name}' split"
    except (StorageError, OSError, ValueError, KeyError, RuntimeError) as err:
        if champion.recorded_accuracy is not None:
            return float(champion.recorded_accuracy), (
                f"could not be re-scored ({err}); using its recorded accuracy instead"
            )
        return None, f"could not be re-scored ({err}) and has no recorded accuracy"


def gate_model(
    accuracy: float,
    threshold: float,
    tolerance: float,
    models_bucket: str,
    model_name: str,
    dataset_dir: Path,
    split_csv: Path,
    store: ObjectStore | None = None,
) -> GateDecision:
    """Fetch and score the champion, then decide; logs the decision and both scores as JSON."""
    store = store or ObjectStore()
    champion = fetch_champion(models_bucket, model_name, store)
    if champion is None:
        decision = gate_decision(accuracy, threshold, tolerance=tolerance)
        comparison = "first model: threshold only"
    else:
        champion_accuracy, how = score_champion(champion, dataset_dir, split_csv, store)
        decision = gate_decision(
            accuracy, threshold, champion_accuracy, tolerance, champion.version
        )
        comparison = f"champion {champion.version} ({champion.storage_uri}) {how}"
    decision = replace(decision, comparison=comparison)
    verdict = "PROMOTE" if decision.promote else "KEEP PRODUCTION"
    print(json.dumps({"gate": verdict, **decision.to_dict()}), flush=True)
    return decision

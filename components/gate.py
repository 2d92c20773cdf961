"""Gate: decide whether a trained model (the challenger) may replace production (the champion).

The challenger must reach ``threshold`` on its test split. Against the champion (the model that
``s3://<models_bucket>/<model_name>/production.json`` names) it is compared like with like: on
the test images that neither model trained on, nor on a copy or neighbour of them (the
champion's bundle records what it trained on; ingest's groups tie neighbours together), with
both models' answers on the very same images (paired). It may make at most ``tolerance`` x
images more errors than the champion there, and no class's recall may drop by more than
``max_recall_drop``. The paired counts and McNemar's exact p-value are logged with the
decision. The first model ever faces the threshold alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainmri.inference_service import INFERENCE_SERVICES, storage_uri_of
from brainmri.model import load_bundle
from brainmri.registry import RecordError, production_record_uri, read_production_record
from brainmri.storage import ObjectStore, StorageError
from brainmri.tracking import CHAMPION_ALIAS, TRACKING_URI_ENV, aliased_version, tracking_uri
from components.evaluate import evaluate_rows
from components.report import markdown_table
from components.split import HASH_PREFIX, group_key, load_split
from components.statistics import PairedComparison, compare_paired

CHAMPION_FROM_PRODUCTION, CHAMPION_FROM_MLFLOW = "production", "mlflow"
CHAMPION_SOURCES = (CHAMPION_FROM_PRODUCTION, CHAMPION_FROM_MLFLOW)


@dataclass(frozen=True)
class Comparison:
    """Challenger and champion on the same test images."""

    images: int
    excluded: int  # test images the champion trained on, or on a copy or neighbour of
    paired: PairedComparison  # first: the challenger, second: the champion
    challenger_recall: dict[str, float]
    champion_recall: dict[str, float]
    how: str  # which images, and why

    @property
    def challenger_accuracy(self) -> float:
        return 1 - self.paired.first_errors / max(self.images, 1)

    @property
    def champion_accuracy(self) -> float:
        return 1 - self.paired.second_errors / max(self.images, 1)


@dataclass(frozen=True)
class GateDecision:
    """Whether to promote, why, and the scores the decision rests on."""

    promote: bool
    reason: str
    challenger_accuracy: float  # on its whole test split
    threshold: float
    tolerance: float
    max_recall_drop: float
    champion_version: str | None = None
    champion_accuracy: float | None = None  # on the compared images (or as recorded)
    compared: dict[str, Any] = field(default_factory=dict)  # the paired counts, per-class recall
    comparison: str = ""  # how the champion was found and scored

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}={value} is not a fraction in [0, 1]")


def gate_decision(
    accuracy: float,
    threshold: float,
    comparison: Comparison | None = None,
    tolerance: float = 0.005,
    max_recall_drop: float = 0.02,
    champion_version: str | None = None,
    recorded_champion_accuracy: float | None = None,
) -> GateDecision:
    """The decision for a challenger of test ``accuracy``: the threshold first, then the
    paired ``comparison`` with the champion (or, when it could not be re-scored, its recorded
    accuracy minus ``tolerance``); no champion: the threshold alone."""
    _check_fraction("accuracy", accuracy)
    for name, value in (("tolerance", tolerance), ("max_recall_drop", max_recall_drop)):
        if value < 0:
            raise ValueError(f"{name}={value} must be >= 0")
    if recorded_champion_accuracy is not None:
        _check_fraction("recorded_champion_accuracy", recorded_champion_accuracy)
    known = {"threshold": threshold, "tolerance": tolerance, "max_recall_drop": max_recall_drop}

    def decide(promote: bool, reason: str) -> GateDecision:
        compared = {} if comparison is None else _compared(comparison, tolerance)
        champion = (
            comparison.champion_accuracy if comparison is not None else recorded_champion_accuracy
        )
        return GateDecision(
            promote,
            reason,
            accuracy,
            **known,
            champion_version=champion_version,
            champion_accuracy=champion,
            compared=compared,
        )

    if accuracy < threshold:
        return decide(False, f"accuracy {accuracy:.4f} < threshold {threshold:.4f}")
    passed = f"accuracy {accuracy:.4f} >= threshold {threshold:.4f}"
    champion = f"production {champion_version or '?'}"
    if comparison is not None:
        return decide(*_paired_verdict(comparison, passed, champion, tolerance, max_recall_drop))
    if recorded_champion_accuracy is None:
        return decide(True, f"{passed}; no production model to compare with")
    verdict = accuracy >= recorded_champion_accuracy - tolerance
    relation = "not worse than" if verdict else "worse than"
    return decide(
        verdict,
        f"{passed}, {relation} {champion}'s recorded {recorded_champion_accuracy:.4f} "
        f"(tolerance {tolerance:.4f}; unpaired: it could not be re-scored)",
    )


def _paired_verdict(
    comparison: Comparison, passed: str, champion: str, tolerance: float, max_recall_drop: float
) -> tuple[bool, str]:
    """Promote or not, and why, on the paired comparison: at most the allowed extra errors,
    and no class's recall lower by more than ``max_recall_drop``."""
    paired, allowed = comparison.paired, _allowed_extra_errors(comparison.images, tolerance)
    extra = paired.first_errors - paired.second_errors
    on = (
        f"on {comparison.images} test images neither trained on: {paired.first_errors} errors "
        f"vs {champion}'s {paired.second_errors} (McNemar p={paired.mcnemar_p:.3g})"
    )
    if extra > allowed:
        return False, f"{passed}, but {on}: {extra} more, allowed {allowed}"
    drops = {
        name: comparison.champion_recall[name] - recall
        for name, recall in comparison.challenger_recall.items()
        if name in comparison.champion_recall
    }
    worst = max(drops, key=drops.get) if drops else None
    if worst is not None and drops[worst] > max_recall_drop + 1e-9:  # float slack
        return False, (
            f"{passed} and {on}, but its {worst} recall drops by {drops[worst]:.4f} "
            f"({comparison.champion_recall[worst]:.4f} -> {comparison.challenger_recall[worst]:.4f}"
            f"), more than max_recall_drop {max_recall_drop:.4f}"
        )
    return True, (
        f"{passed} and {on}: within {allowed} allowed extra errors "
        "and no class's recall drops too far"
    )


def _allowed_extra_errors(images: int, tolerance: float) -> int:
    return math.floor(tolerance * images + 1e-9)


def _compared(comparison: Comparison, tolerance: float) -> dict[str, Any]:
    return {
        **asdict(comparison.paired),
        "excluded": comparison.excluded,
        "allowed_extra_errors": _allowed_extra_errors(comparison.images, tolerance),
        "mcnemar_p": comparison.paired.mcnemar_p,
        "challenger_accuracy": comparison.challenger_accuracy,
        "champion_accuracy": comparison.champion_accuracy,
        "challenger_recall": comparison.challenger_recall,
        "champion_recall": comparison.champion_recall,
        "how": comparison.how,
    }


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


def mlflow_champion(model_name: str) -> Champion | None:
    """The version MLflow's ``champion`` alias points at (promote moves it; a person may too),
    or None when it points nowhere yet."""
    if tracking_uri() is None:
        raise ValueError(
            f"champion_from='{CHAMPION_FROM_MLFLOW}' needs {TRACKING_URI_ENV} (the MLflow "
            "tracking server); set it, or use champion_from='production'"
        )
    registered = aliased_version(model_name, CHAMPION_ALIAS)
    if registered is None:
        return None
    accuracy = registered.tags.get("accuracy")
    return Champion(
        registered.tags.get("version", f"mlflow version {registered.number}"),
        registered.tags.get("storage_uri", registered.source),
        float(accuracy) if accuracy not in (None, "", "None") else None,
    )


def find_champion(
    models_bucket: str, model_name: str, store: ObjectStore, champion_from: str
) -> tuple[Champion | None, str]:
    """The champion from the production record, or from MLflow's ``champion`` alias (the record
    stands in while the alias points nowhere); and a note when the two disagree."""
    if champion_from not in CHAMPION_SOURCES:
        raise ValueError(
            f"champion_from={champion_from!r}: expected one of {', '.join(CHAMPION_SOURCES)}"
        )
    if champion_from == CHAMPION_FROM_PRODUCTION:
        return fetch_champion(models_bucket, model_name, store), ""
    registered = mlflow_champion(model_name)
    production = fetch_champion(models_bucket, model_name, store)
    if registered is None:
        return production, "MLflow has no champion alias yet: the production record's model"
    if production is not None and production.storage_uri != registered.storage_uri:
        return registered, (
            f"MLflow's champion {registered.version} is not what production.json serves "
            f"({production.version}); compared with MLflow's, as champion_from asks"
        )
    return registered, "MLflow's champion alias"


def unseen_test_rows(frame: pd.DataFrame, seen: set[str]) -> pd.DataFrame:
    """The test rows of ``frame`` whose group holds no image of the hash prefixes ``seen``."""
    prefixes = frame["content_hash"].astype(str).str[:HASH_PREFIX]
    keys = group_key(frame)
    touched = set(keys[prefixes.isin(seen)])
    test = frame["split"] == "test"
    return frame[test & ~keys.isin(touched)]


def compare_with_champion(
    champion_uri: str,
    predictions: pd.DataFrame,
    dataset_dir: Path,
    split_csv: Path,
    store: ObjectStore | None = None,
) -> Comparison:
    """Score the champion on the challenger's test images it never trained on (nor on a copy
    or neighbour of them), and pair its answers with the challenger's ``predictions``."""
    bundle = load_bundle(champion_uri, store=store)
    frame = load_split(Path(split_csv))
    seen = set(bundle.metadata.get("data", {}).get("trained_on") or [])
    test = frame[frame["split"] == "test"]
    if seen and "content_hash" in frame:
        rows = unseen_test_rows(frame, seen)
        how = (
            f"the {len(rows)} of {len(test)} test images whose group the champion never trained on"
        )
    else:
        rows = test
        how = f"all {len(test)} test images (the champion's bundle does not say what it trained on)"
    if rows.empty:
        raise ValueError(f"no test image is unseen by the champion ({how})")
    champion = evaluate_rows(bundle, Path(dataset_dir), rows, "champion on unseen test images")
    challenger = predictions.set_index("path").loc[champion.predictions["path"]]
    truth = champion.predictions["true_label"].to_numpy()
    paired = compare_paired(challenger["correct"].to_numpy(), champion.predictions["correct"])
    return Comparison(
        images=len(rows),
        excluded=len(test) - len(rows),
        paired=paired,
        challenger_recall=_recalls(truth, challenger["correct"].to_numpy()),
        champion_recall=_recalls(truth, champion.predictions["correct"].to_numpy()),
        how=how,
    )


def _recalls(truth: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    return {str(c): float(correct[truth == c].mean()) for c in sorted(set(truth))}


def gate_model(
    accuracy: float,
    threshold: float,
    models_bucket: str,
    model_name: str,
    predictions: pd.DataFrame,
    dataset_dir: Path,
    split_csv: Path,
    *,
    tolerance: float = 0.005,
    max_recall_drop: float = 0.02,
    store: ObjectStore | None = None,
    api_client: Any = None,
    namespace: str = "brain-mri",
    champion_from: str = CHAMPION_FROM_PRODUCTION,
) -> GateDecision:
    """Fetch and score the champion, then decide; logs the decision and the scores as JSON.

    It fails closed: with no production record while the InferenceService exists (``api_client``
    given), or with an unreadable record, it stops naming the object instead of treating the
    challenger as the first model. When the champion cannot be loaded or scored, its recorded
    accuracy stands in (noted as such). ``champion_from`` "mlflow" takes the champion from MLflow's
    ``champion`` alias (:func:`find_champion`)."""
    store = store or ObjectStore()
    champion, found_by = find_champion(models_bucket, model_name, store, champion_from)
    limits = {"tolerance": tolerance, "max_recall_drop": max_recall_drop}
    if champion is None:
        live = INFERENCE_SERVICES.get(api_client, namespace, model_name) if api_client else None
        if live is not None:
            raise RecordError(
                f"{production_record_uri(models_bucket, model_name)} is missing, but "
                f"{INFERENCE_SERVICES.describe(namespace, model_name)} exists and serves "
                f"{storage_uri_of(live)}: restore the record (version and storage_uri of what it "
                "serves) before promoting; the gate does not take this for a first model"
            )
        decision = gate_decision(accuracy, threshold, **limits)
        return _logged(decision, "first model: threshold only")
    where = (
        f"champion {champion.version} ({'; '.join(filter(None, [champion.storage_uri, found_by]))})"
    )
    try:
        comparison = compare_with_champion(
            champion.storage_uri, predictions, dataset_dir, split_csv, store
        )
    except (StorageError, OSError, ValueError, KeyError, RuntimeError) as err:  # BundleError too
        if champion.recorded_accuracy is None:
            decision = gate_decision(accuracy, threshold, **limits)
            return _logged(
                decision, f"{where} could not be re-scored ({err}), no recorded accuracy"
            )
        decision = gate_decision(
            accuracy,
            threshold,
            None,
            **limits,
            champion_version=champion.version,
            recorded_champion_accuracy=float(champion.recorded_accuracy),
        )
        return _logged(decision, f"{where} could not be re-scored ({err}); its recorded accuracy")
    decision = gate_decision(
        accuracy, threshold, comparison, **limits, champion_version=champion.version
    )
    return _logged(decision, f"{where} scored on {comparison.how}")


def _logged(decision: GateDecision, comparison: str) -> GateDecision:
    decision = GateDecision(**{**decision.to_dict(), "comparison": comparison})
    verdict = "PROMOTE" if decision.promote else "KEEP PRODUCTION"
    print(json.dumps({"gate": verdict, **decision.to_dict()}), flush=True)
    return decision


def render_gate_report(decision: GateDecision) -> str:
    """The decision as Markdown for the KFP UI: the verdict, the reason, both scores and the
    paired counts."""
    verdict = "PROMOTE" if decision.promote else "KEEP PRODUCTION"
    lines = [f"# Gate: {verdict}", "", decision.reason, "", f"Champion: {decision.comparison}", ""]
    rows = [
        ("challenger accuracy (its test split)", f"{decision.challenger_accuracy:.4f}"),
        ("threshold", f"{decision.threshold:.4f}"),
        ("tolerance (extra errors / image)", f"{decision.tolerance:.4f}"),
        ("max recall drop per class", f"{decision.max_recall_drop:.4f}"),
    ]
    compared = decision.compared
    if compared:
        rows += [
            ("images compared (neither model trained on)", compared["images"]),
            (
                "test images left out (the champion trained on them or a neighbour)",
                compared["excluded"],
            ),
            (
                "challenger / champion accuracy there",
                f"{compared['challenger_accuracy']:.4f} / {compared['champion_accuracy']:.4f}",
            ),
            (
                "both right / only challenger / only champion / both wrong",
                f"{compared['both_right']} / {compared['only_first_right']} / "
                f"{compared['only_second_right']} / {compared['both_wrong']}",
            ),
            ("McNemar exact p", f"{compared['mcnemar_p']:.3g}"),
            ("extra errors allowed", compared["allowed_extra_errors"]),
        ]
    elif decision.champion_accuracy is not None:
        rows.append(("champion accuracy (recorded)", f"{decision.champion_accuracy:.4f}"))
    lines += markdown_table(("", "value"), rows)
    if compared:
        lines += ["", "Recall per class on the compared images:", ""]
        lines += markdown_table(
            ("class", "challenger", "champion"),
            [
                (
                    name,
                    f"{recall:.4f}",
                    f"{compared['champion_recall'].get(name, float('nan')):.4f}",
                )
                for name, recall in compared["challenger_recall"].items()
            ],
        )
    return "\n".join(lines) + "\n"

"""What each step records in MLflow when tracking is on (:mod:`brainmri.tracking`).

- train: the knobs as parameters, the data's fingerprints and source as tags, the split manifest
  as an artifact, each epoch's row of the history as metrics at that step (live; any epoch the
  live logging missed, e.g. one a PyTorchJob ran, is filled in at the end) and the summary;
- evaluate: the test metrics (``test_*``) and the HTML and Markdown reports and predictions;
- gate: the decision and both scores (``gate_*``);
- promote: a registered model version carrying the storage URI, the data fingerprint and the
  split manifest, with the ``champion`` alias moved to it.

Every function takes the run (``None`` when tracking is off: it then does nothing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from brainmri.tracking import (
    CHAMPION_ALIAS,
    RegisteredVersion,
    TrackedRun,
    TrackingError,
    attach_run,
    register_version,
    start_run,
)

SPLIT_MANIFEST_ARTIFACT = "data/split_manifest.csv"
EVALUATION_FOLDER = "evaluation"
# the history's columns that are not metrics
_NOT_METRICS = ("epoch", "phase")


def open_training_run(
    experiment: str,
    pipeline_run_id: str,
    params: Mapping[str, Any],
    data: Mapping[str, Any],
    split_csv: Path,
) -> TrackedRun | None:
    """The pipeline run's MLflow run (opened, or found again on a retry), with the knobs,
    the data's tags and the split manifest logged."""
    run_id = pipeline_run_id if pipeline_run_id not in ("", "local") else None
    tracked = start_run(experiment, f"{experiment} {pipeline_run_id}", run_id)
    if tracked is None:
        return None
    tracked.log_params(params)
    tracked.set_tags({f"data.{k}": v for k, v in data.items() if v is not None})
    folder, name = SPLIT_MANIFEST_ARTIFACT.rsplit("/", 1)
    tracked.log_artifact(split_csv, folder, name)
    return tracked


def epoch_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric columns of one epoch's row of the history."""
    return {
        k: float(v)
        for k, v in row.items()
        if k not in _NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool)
    }


def epoch_logger(tracked: TrackedRun | None) -> Callable[[dict[str, Any]], None] | None:
    """Log each epoch as it ends; an unreachable server costs a warning, not the training
    (:func:`log_training` fills in what was missed)."""
    if tracked is None:
        return None

    def log(row: dict[str, Any]) -> None:
        try:
            tracked.log_metrics(epoch_metrics(row), step=int(row["epoch"]))
        except TrackingError as err:
            print(f"warning: epoch {row['epoch']} not logged yet: {err}", flush=True)

    return log


def log_training(
    tracked: TrackedRun | None, history: list[dict[str, Any]], summary: Mapping[str, float]
) -> None:
    """Log the epochs not logged yet (checked against the server), the summary, and end the
    run's training part."""
    if tracked is None:
        return
    done = tracked.logged_steps("val_accuracy")
    for row in history:
        if int(row["epoch"]) not in done:
            tracked.log_metrics(epoch_metrics(row), step=int(row["epoch"]))
    tracked.log_metrics(summary)
    tracked.finish()


def log_evaluation(
    tracked: TrackedRun | None, metrics: Mapping[str, float], files: Mapping[str, str]
) -> None:
    """The test metrics (as ``test_<name>``) and the report ``files`` (path -> artifact name)."""
    if tracked is None:
        return
    tracked.log_metrics(
        {k if k.startswith("test_") else f"test_{k}": v for k, v in metrics.items()}
    )
    for path, name in files.items():
        tracked.log_artifact(Path(path), EVALUATION_FOLDER, name)


def log_gate(tracked: TrackedRun | None, promote: bool, scores: Mapping[str, float | None]) -> None:
    """The gate's decision and scores (as ``gate_<name>``)."""
    if tracked is None:
        return
    tracked.log_metrics({f"gate_{k}": v for k, v in scores.items() if v is not None})
    tracked.set_tags({"gate": "PROMOTE" if promote else "KEEP PRODUCTION"})


def register_promotion(
    model_name: str,
    version: str,
    storage_uri: str,
    trained_on: Mapping[str, Any],
    accuracy: float | None,
    tracked: TrackedRun | None,
) -> RegisteredVersion | None:
    """Register the version now in production, with what it was trained on, and move the
    ``champion`` alias to it. None when tracking is off."""
    data = trained_on.get("data", {})
    tags = {
        "version": version,
        "storage_uri": storage_uri,
        "accuracy": accuracy,
        "data_fingerprint": data.get("dataset_fingerprint"),
        "split_fingerprint": data.get("split_fingerprint"),
        "split_manifest": tracked.artifact_uri(SPLIT_MANIFEST_ARTIFACT) if tracked else None,
    }
    registered = register_version(
        model_name, storage_uri, tags, run_id=tracked.run_id if tracked else None
    )
    if tracked is not None and registered is not None:
        tracked.set_tags({"promoted_version": version, "registered_version": registered.number})
    return registered


def registry_note(
    model_name: str,
    version: str,
    storage_uri: str,
    trained_on: Mapping[str, Any],
    accuracy: float | None,
    run_id: str | None,
) -> str:
    """:func:`register_promotion` as the promote step reports it: "" when tracking is off,
    else the registered version. By now the version serves and the production record names
    it, so an MLflow failure is a warning saying so, not a failed (and retried) rollout."""
    try:
        registered = register_promotion(
            model_name, version, storage_uri, trained_on, accuracy, attach_run(run_id)
        )
    except TrackingError as err:
        note = f"not registered: {err}"
        print(f"warning: {version} serves and production.json names it, but {note}", flush=True)
        return note
    if registered is None:
        return ""
    return f"version {registered.number} of {model_name}, alias {CHAMPION_ALIAS}"

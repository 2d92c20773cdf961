"""Training checkpoints: what one holds (:class:`TrainState`) and where it lives
(:class:`Checkpoints`, ``last.pt`` under an ``s3://`` prefix or in a local folder).

The train step saves the whole state after every epoch; a retried task resumes after the last
finished epoch, but only from a checkpoint of the very same configuration and split (its
*identity*), so a changed run never continues a different one.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainmri.storage import ObjectStore, fetch, location_exists, publish

CHECKPOINT_FILE = "last.pt"
CHECKPOINT_FORMAT = 3  # 3: the moving average of the weights (``ema``) too


@dataclass
class TrainState:
    """Where training is: what a checkpoint holds, and what a resumed run continues from."""

    epoch: int = 0  # the last finished epoch
    phase: str | None = None  # "head" or "full"
    finished: bool = False
    stopped_early: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: tuple[float, float] = (-1.0, float("-inf"))  # (val accuracy, -val loss)
    best_epoch: int = 0
    best_weights: dict[str, torch.Tensor] | None = None
    best_source: str = "raw"  # "ema" when the best weights are the moving average's
    stale_epochs: int = 0
    training_seconds: float = 0.0
    model: dict[str, Any] | None = None  # the latest weights, and what continues them
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    scaler: dict[str, Any] | None = None
    ema: dict[str, Any] | None = None  # the moving average of the weights (AveragedModel)

    def record(self, row: dict[str, Any], model: nn.Module, ema: nn.Module | None = None) -> None:
        """Add an epoch's row; keep the weights of ``model``, or of its moving average ``ema``
        (scored in the row as ``ema_val_*``) when that scores better, if best so far."""
        self.history.append(row)
        self.epoch = row["epoch"]
        candidates = [((row["val_accuracy"], -row["val_loss"]), "raw", model)]
        if ema is not None:
            candidates.append(((row["ema_val_accuracy"], -row["ema_val_loss"]), "ema", ema))
        score, source, network = max(candidates, key=lambda c: c[0])
        if score > self.best_score:
            self.best_score, self.best_epoch, self.stale_epochs = score, row["epoch"], 0
            self.best_source = source
            weights = network.state_dict().items()
            self.best_weights = {k: v.detach().cpu().clone() for k, v in weights}
        else:
            self.stale_epochs += 1

    def to_checkpoint(self, identity: dict[str, Any], *live: Any) -> dict[str, Any]:
        """This state as saved, with the ``state_dict()`` of the live model, optimiser,
        schedule, loss scaler and moving average (in that order; the last may be None)."""
        states = [None if x is None else x.state_dict() for x in live]
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = states
        self.model = {k: v.detach().cpu() for k, v in self.model.items()}
        checkpoint = asdict(self) | {"best_score": list(self.best_score)}
        return checkpoint | {"format": CHECKPOINT_FORMAT, "identity": identity}

    @classmethod
    def from_checkpoint(cls, saved: dict[str, Any], identity: dict[str, Any]) -> TrainState | None:
        """The state of a checkpoint of this very run (configuration and split), else None."""
        if saved.get("format") != CHECKPOINT_FORMAT or saved.get("identity") != identity:
            return None
        values = {f.name: saved[f.name] for f in fields(cls)}
        return cls(**{**values, "best_score": tuple(values["best_score"])})


class CorruptCheckpointWarning(UserWarning):
    """A checkpoint exists but cannot be read; training starts from scratch."""


class Checkpoints:
    """The last :class:`TrainState`, ``last.pt`` under an ``s3://`` prefix or a local folder."""

    def __init__(self, location: str, store: ObjectStore | None = None) -> None:
        self.location = f"{location.rstrip('/')}/{CHECKPOINT_FILE}"
        self.store = store

    def __str__(self) -> str:
        return self.location

    def load(self) -> dict[str, Any] | None:
        """The saved checkpoint, or None when there is none yet, or when it cannot be read
        (truncated, corrupt, not a checkpoint): then training starts anew with a warning
        instead of failing every retry on the same file."""
        if not location_exists(self.location, self.store):
            return None
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            path = fetch(self.location, Path(tmp) / CHECKPOINT_FILE, self.store)
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - any unreadable file means the same
                saved = err
        if not isinstance(saved, dict):
            reason = saved if isinstance(saved, Exception) else f"holds a {type(saved).__name__}"
            warnings.warn(
                f"checkpoint {self.location} cannot be read ({reason}); training starts from "
                "scratch and will overwrite it",
                CorruptCheckpointWarning,
                stacklevel=2,
            )
            return None
        return saved

    def save(self, checkpoint: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            torch.save(checkpoint, Path(tmp) / CHECKPOINT_FILE)
            publish(Path(tmp) / CHECKPOINT_FILE, self.location, self.store)

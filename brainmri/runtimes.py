"""What runs the network's forward pass: eager PyTorch, ONNX Runtime or OpenVINO (:data:`RUNTIMES`).

Each runtime maps a preprocessed float batch ``[N, 3, S, S]`` to the network's logits ``[N, C]``
and its last feature map ``[N, D, h, w]`` (what calibration, the out-of-distribution score and the
activation maps of :mod:`brainmri.trust` read), so whatever runs the network, the bundle answers
alike. :func:`export_onnx` writes the network in that shape as ONNX (``model.onnx`` in a bundle,
checked with ``onnx.checker``), the input size fixed and the batch dynamic; normalisation and the
test-time flip stay in the shared preprocessing and :class:`~brainmri.model.ModelBundle`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from brainmri.backbones import get_backbone
from brainmri.cpu import loaded_allocator

RUNTIMES = ("torch", "onnxruntime", "openvino", "openvino-bf16", "openvino-int8")
# the fastest on 2 CPU cores of the runtimes that answer as eager PyTorch does (fp32), by
# make bench-serve on EfficientNet-Lite0 at 160 px with flip averaging (benchmarks/results/
# serve.json): its raw forward 1.16x OpenVINO's, served within a few per cent of it; OpenVINO
# bf16 and INT8 are faster raw but change held-out answers
DEFAULT_RUNTIME = "onnxruntime"
ONNX_FILE = "model.onnx"
# the network quantised to INT8 by NNCF (OpenVINO IR: the .xml graph and its .bin weights)
INT8_FILES = ("model-int8.xml", "model-int8.bin")
ONNX_OPSET = 18
OUTPUTS = ("logits", "feature_map")


class RuntimeUnavailable(RuntimeError):
    """A runtime cannot serve this bundle (its package or exported file is missing)."""


class Runtime(Protocol):
    name: str

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, C], last feature map [N, D, h, w]) of a preprocessed batch."""


class TwoOutputs(nn.Module):
    """The classifier as one graph with two outputs: its logits and its last feature map (the
    head is a linear layer over that map's spatial mean). What is exported, and what the eager
    runtime runs."""

    def __init__(self, model: nn.Module, backbone: str) -> None:
        super().__init__()
        spec = get_backbone(backbone)
        self.model, self.feature_map = model, spec.feature_map
        self.head = model.get_submodule(spec.head)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps = self.feature_map(self.model, pixels)
        return self.head(maps.mean(dim=(2, 3))), maps


class TorchRuntime:
    """Eager PyTorch on the bundle's own network."""

    name = "torch"

    def __init__(self, model: nn.Module, backbone: str) -> None:
        self.network = TwoOutputs(model, backbone).eval()

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        device = next(self.network.parameters()).device
        logits, maps = self.network(pixels.to(device, non_blocking=True))
        return logits.float().cpu(), maps.float().cpu()


def export_onnx(model: nn.Module, backbone: str, image_size: int, path: Path) -> Path:
    """Write the network (logits and last feature map) to ``path`` as ONNX for inputs
    ``[N, 3, image_size, image_size]``, and check it with ``onnx.checker``."""
    import onnx

    network = TwoOutputs(model, backbone).to("cpu").eval()
    example = torch.zeros(2, 3, image_size, image_size)
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            network,
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=list(OUTPUTS),
            dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}},
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    onnx.checker.check_model(str(path), full_check=True)
    return Path(path)


class OnnxRuntime:
    """ONNX Runtime's CPU execution provider on the exported graph."""

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None) -> None:
        try:
            import onnxruntime
        except ImportError as err:
            raise RuntimeUnavailable(f"onnxruntime is not installed ({err})") from err
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, maps = self.session.run(list(OUTPUTS), {"pixels": pixels.numpy()})
        return torch.from_numpy(logits), torch.from_numpy(maps)


class OpenVinoRuntime:
    """OpenVINO on the CPU, in fp32 or bf16 (where the CPU computes bf16 natively), or its INT8
    network; ``streams`` forward passes run at once (one per calling thread), each on
    ``threads`` threads."""

    PRECISIONS = {"openvino": "f32", "openvino-bf16": "bf16", "openvino-int8": "f32"}

    def __init__(
        self, path: Path, name: str = "openvino", threads: int | None = None, streams: int = 1
    ) -> None:
        """``path``: the ONNX export, or the OpenVINO IR (``.xml``) of ``openvino-int8``."""
        malloc = loaded_allocator()
        if malloc != "glibc":  # its libraries free memory that this malloc did not give
            raise RuntimeUnavailable(
                f"OpenVINO aborts in a process whose malloc is {malloc} (LD_PRELOAD): "
                "serve without preloading it"
            )
        try:
            import openvino
        except ImportError as err:
            raise RuntimeUnavailable(f"openvino is not installed ({err})") from err
        # one stream serialises its callers: as many streams as threads calling at once
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": self.PRECISIONS[name],
            "NUM_STREAMS": max(1, streams),
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads * max(1, streams)
        self.name = name
        self.compiled = openvino.Core().compile_model(str(path), "CPU", config)
        self._local = threading.local()  # an infer request per thread: they are not shared

    def __call__(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        result = request.infer({"pixels": pixels.numpy()})
        logits, maps = (result[self.compiled.output(name)] for name in OUTPUTS)
        return torch.from_numpy(logits.copy()), torch.from_numpy(maps.copy())


def load_runtime(
    name: str,
    model: nn.Module,
    backbone: str,
    directory: Path | None,
    threads: int | None = None,
    streams: int = 1,
) -> Runtime:
    """The runtime ``name`` for a bundle's network (``directory`` holds its ``model.onnx``, and
    ``model-int8.xml`` when training kept a quantised network), for ``streams`` threads calling
    it at once on ``threads`` threads each."""
    if name not in RUNTIMES:
        raise ValueError(f"unknown runtime {name!r}; choose one of {RUNTIMES}")
    if name == "torch":
        return TorchRuntime(model, backbone)
    path = Path(directory or ".") / (INT8_FILES[0] if name == "openvino-int8" else ONNX_FILE)
    if not path.is_file():
        why = "no quantised network" if name == "openvino-int8" else "no exported network"
        raise RuntimeUnavailable(f"{path} missing: the bundle has {why}")
    if name == "onnxruntime":
        return OnnxRuntime(path, threads)
    return OpenVinoRuntime(path, name, threads, streams)


def quantize_int8(
    onnx_path: Path, calibration: Iterable[torch.Tensor], directory: Path, subset_size: int = 300
) -> Path:
    """Quantise the exported network to INT8 with NNCF's post-training quantisation, calibrated
    on ``calibration`` (preprocessed batches of training images), into ``directory`` as
    ``model-int8.xml`` and ``.bin``; the path of the ``.xml``."""
    try:
        import nncf
        import openvino
    except ImportError as err:
        raise RuntimeUnavailable(f"INT8 needs nncf and openvino ({err})") from err
    network = openvino.Core().read_model(str(onnx_path))
    dataset = nncf.Dataset(list(calibration), lambda batch: {"pixels": batch.numpy()})
    quantized = nncf.quantize(
        network, dataset, preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=subset_size
    )
    path = Path(directory) / INT8_FILES[0]
    openvino.save_model(quantized, str(path), compress_to_fp16=False)
    return path

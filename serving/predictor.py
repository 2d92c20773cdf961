"""The KServe predictor: a trained model bundle behind the v1 and v2 inference protocols.

:class:`BrainMRIModel` follows KServe's custom-model shape: ``load`` fetches the bundle,
``preprocess`` turns a request into one preprocessed batch (decoding on a thread pool, the
protocols' reading and refusals in :mod:`serving.protocol`), ``predict`` runs one forward pass
for all of it on a small pool of its own (so the event loop stays free for health probes), and
``postprocess`` writes the protocol's answer. ``explain`` (KServe's ``:explain`` verb) adds a
class-activation heatmap and its hottest box to each answer. Every answer is calibrated and
carries its prediction set, ``uncertain`` flag and out-of-distribution score
(:mod:`brainmri.trust`, fitted in training); a rejected image is answered ``not_brain_mri``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from kserve import InferRequest, InferResponse, Model
from kserve.errors import InvalidInput, ModelNotReady
from kserve.logging import logger
from PIL import Image
from prometheus_client import Counter, Gauge, Histogram

from brainmri.cpu import cpu_budget
from brainmri.model import ModelBundle, load_bundle
from brainmri.trust import Assessment, heatmaps
from serving import protocol
from serving.batching import Batcher
from serving.protocol import IMAGE_KEY, LABEL_OUTPUT, PIXELS_INPUT, PROBABILITIES_OUTPUT, Limits

DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_PAYLOAD_BYTES = 16 * 1024 * 1024  # a full FP32 batch of 32 at 192 px is 14 MB
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
UNKNOWN_VERSION = "unknown"

# Prometheus metrics, next to KServe's request_{preprocess,predict,postprocess}_seconds on /metrics
IMAGES_PER_REQUEST = Histogram(
    "brainmri_request_images",
    "Images per accepted inference request (one forward pass each).",
    ["model_name"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
REJECTED_REQUESTS = Counter(
    "brainmri_rejected_requests",
    "Inference requests refused with a 4xx, by reason.",
    ["model_name", "reason"],
)
ANSWERS = Counter(
    "brainmri_answers",
    "Images answered, by kind: confident, uncertain, or not_brain_mri (rejected as not a brain "
    "MRI slice; also counted as uncertain).",
    ["model_name", "kind"],
)
MODEL_INFO = Gauge(
    "brainmri_model_info",
    "The served model bundle (value 1): version, backbone, input size and runtime as labels.",
    ["model_name", "version", "backbone", "image_size", "runtime"],
)


@dataclass(frozen=True)
class Batch:
    """A validated request: the preprocessed batch, the v2 request it came from (or None), and
    the size of each image as sent (None for preprocessed pixels)."""

    pixels: torch.Tensor  # float32 [N, 3, S, S], normalised as in training
    v2_request: InferRequest | None = None
    sizes: list[tuple[int, int]] | None = None  # (height, width) of each image as sent

    def __len__(self) -> int:
        return int(self.pixels.shape[0])


@dataclass(frozen=True)
class Prediction:
    """What the forward pass says of a :class:`Batch` (:class:`~brainmri.trust.Assessment`)."""

    batch: Batch
    assessment: Assessment


@dataclass(frozen=True)
class Explanation(Prediction):
    """A :class:`Prediction` with each image's heatmap (at the size it was sent) for the
    ``explained`` class (its top tumour class)."""

    heatmaps: list[torch.Tensor] = field(default_factory=list)
    explained: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))


class BrainMRIModel(Model):
    """Serves a :class:`~brainmri.model.ModelBundle` loaded from ``s3://`` or a local directory.

    ``max_batch_size`` caps the images of one request, ``max_payload_bytes`` the declared size of
    its body (the HTTP middleware in :mod:`serving.limits` enforces it before the body is read;
    this is the same check for requests that reach the model another way), ``max_image_pixels``
    the pixels of one image before it is decoded. ``decode_workers`` threads decode and
    preprocess images (default: the process's CPU budget); ``forward_workers`` forward passes
    may run at once (default 1; ``python -m serving`` picks it for the device), each run by
    ``runtime`` (:mod:`brainmri.runtimes`, given a stream per forward worker so that they run in
    parallel) on ``runtime_threads`` threads. With
    ``max_batch_latency_ms`` above 0, the images of concurrent requests share forward passes
    (:class:`~serving.batching.Batcher`: up to ``max_batch_size`` images, or that long).
    """

    def __init__(
        self,
        name: str,
        storage_uri: str,
        *,
        device: torch.device | str | None = None,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        decode_workers: int | None = None,
        forward_workers: int = 1,
        runtime: str = "torch",
        runtime_threads: int | None = None,
        max_batch_latency_ms: float = 0.0,
    ) -> None:
        super().__init__(name)
        for what, value in (
            ("max_batch_size", max_batch_size),
            ("max_payload_bytes", max_payload_bytes),
            ("max_image_pixels", max_image_pixels),
            ("decode_workers", 1 if decode_workers is None else decode_workers),
            ("forward_workers", forward_workers),
        ):
            if value < 1:
                raise ValueError(f"{what} must be at least 1, got {value}")
        self.storage_uri = storage_uri
        self.limits = Limits(max_batch_size, max_payload_bytes, max_image_pixels)
        self.decode_workers = decode_workers or cpu_budget()
        self.forward_workers = forward_workers
        self.runtime, self.runtime_threads = runtime, runtime_threads
        if max_batch_latency_ms < 0:
            raise ValueError(f"max_batch_latency_ms must be >= 0, got {max_batch_latency_ms}")
        self.max_batch_latency_ms = max_batch_latency_ms
        self._batcher: Batcher | None = None
        self._device = device
        self.bundle: ModelBundle | None = None
        self.model_version = UNKNOWN_VERSION
        # Created on first use (so the model also works after being pickled into a worker
        # process): decoding in parallel, and a bounded number of forward passes at a time,
        # which keeps torch's threads from oversubscribing the CPU under concurrent requests.
        self._decode_pool: ThreadPoolExecutor | None = None
        self._forward_pool: ThreadPoolExecutor | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_decode_pool"] = state["_forward_pool"] = None  # thread pools do not pickle
        state["_batcher"] = None
        return state

    # -- loading -------------------------------------------------------------------------
    def load(self) -> bool:
        """Fetch the bundle, rebuild the network, run one warm-up pass, then report ready."""
        started = time.perf_counter()
        device = torch.device(self._device) if self._device is not None else None
        bundle = load_bundle(
            self.storage_uri,
            device,
            runtime=self.runtime,
            threads=self.runtime_threads,
            streams=self.forward_workers,
        )
        self._warm_up(bundle)
        self.bundle = bundle
        self.model_version = str(bundle.metadata.get("version") or UNKNOWN_VERSION)
        size = str(bundle.preprocess.image_size)
        labels = (self.name, self.model_version, bundle.backbone, size, bundle.runtime_name)
        MODEL_INFO.labels(*labels).set(1)
        self.ready = True
        logger.info(
            "Model %r ready in %.2fs: %s %s, version %s, classes %s, input %dpx, device %s, "
            "runtime %s",
            self.name,
            time.perf_counter() - started,
            bundle.backbone,
            self.storage_uri,
            self.model_version,
            bundle.class_names,
            bundle.preprocess.image_size,
            bundle.device,
            bundle.runtime_name,
        )
        return self.ready

    @staticmethod
    def _warm_up(bundle: ModelBundle) -> None:
        """One pass through decode-free preprocessing and the network, so the first request is
        not slow; it also checks the network's output against the bundle's classes."""
        size = bundle.preprocess.image_size
        pixels = bundle.preprocess(Image.new("RGB", (size, size))).unsqueeze(0)
        probs = bundle.predict_proba(pixels)
        if probs.shape != (1, len(bundle.class_names)):
            raise RuntimeError(
                f"model output shape {tuple(probs.shape)} does not match "
                f"{len(bundle.class_names)} classes {bundle.class_names}"
            )

    def stop(self) -> None:
        super().stop()
        for pool in (self._decode_pool, self._forward_pool):
            if pool is not None:
                pool.shutdown(wait=False)  # queued work still finishes
        self._decode_pool = self._forward_pool = None
        self._batcher = None

    def _pools(self) -> tuple[ThreadPoolExecutor, ThreadPoolExecutor]:
        if self.bundle is None or not self.ready:
            raise ModelNotReady(self.name, "Its bundle is not loaded (load() not run, or stopped).")
        if self._decode_pool is None:
            self._decode_pool = ThreadPoolExecutor(
                max_workers=self.decode_workers, thread_name_prefix="brainmri-decode"
            )
        if self._forward_pool is None:
            self._forward_pool = ThreadPoolExecutor(
                max_workers=self.forward_workers, thread_name_prefix="brainmri-forward"
            )
        return self._decode_pool, self._forward_pool

    @property
    def image_size(self) -> int:
        return self.bundle.preprocess.image_size if self.bundle else -1

    # -- v2 metadata -----------------------------------------------------------------------
    def get_input_types(self) -> list[dict]:
        """Two alternative inputs; a request sends exactly one of them."""
        size = self.image_size
        return [
            {"name": IMAGE_KEY, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS_INPUT, "datatype": "FP32", "shape": [-1, 3, size, size]},
        ]

    def get_output_types(self) -> list[dict]:
        classes = len(self.bundle.class_names) if self.bundle else -1
        return [
            {"name": LABEL_OUTPUT, "datatype": "BYTES", "shape": [-1]},
            {"name": PROBABILITIES_OUTPUT, "datatype": "FP32", "shape": [-1, classes]},
        ]

    # -- inference -------------------------------------------------------------------------
    async def preprocess(
        self, payload: dict | InferRequest | Any, headers: dict[str, str] | None = None
    ) -> Batch:
        """Validate the request and turn it into one preprocessed batch (off the event loop)."""
        try:
            protocol.check_declared_size(headers, self.limits)
            if isinstance(payload, InferRequest):
                tensor = protocol.v2_input(payload, self.image_size)
                if tensor.datatype == "FP32":
                    pixels = protocol.v2_pixels(tensor, self.image_size, self.limits)
                    batch = Batch(pixels, v2_request=payload)
                else:
                    encoded = protocol.v2_encoded_images(tensor, self.limits)
                    where = protocol.v2_location(tensor.name)
                    pixels, sizes = await self._pixels_of(encoded, where)
                    batch = Batch(pixels, v2_request=payload, sizes=sizes)
            else:
                encoded = protocol.v1_encoded_images(payload, self.limits)
                pixels, sizes = await self._pixels_of(encoded, protocol.v1_location)
                batch = Batch(pixels, sizes=sizes)
        except InvalidInput:
            REJECTED_REQUESTS.labels(self.name, "invalid_input").inc()
            raise
        IMAGES_PER_REQUEST.labels(self.name).observe(len(batch))
        return batch

    def validate(self, payload: Any) -> Any:
        # kserve's protocol checks index into dicts; ours is already validated
        return payload if isinstance(payload, Batch) else super().validate(payload)

    async def predict(
        self,
        payload: Batch,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> Prediction:
        """One forward pass for all instances, assessed (calibrated, sets, flags); with
        ``max_batch_latency_ms``, shared with the images of concurrent requests."""
        _, forward_pool = self._pools()
        if self.max_batch_latency_ms > 0:
            if self._batcher is None:
                self._batcher = Batcher(
                    self.bundle.assess,
                    forward_pool,
                    self.limits.max_batch_size,
                    self.max_batch_latency_ms / 1000,
                    self.forward_workers,
                )
            return Prediction(payload, await self._batcher.submit(payload.pixels))
        loop = asyncio.get_running_loop()
        assessment = await loop.run_in_executor(forward_pool, self.bundle.assess, payload.pixels)
        return Prediction(payload, assessment)

    async def explain(self, payload: Batch, headers: dict[str, str] | None = None) -> Explanation:
        """The prediction plus, for each image, where the evidence for its top class is."""
        _, forward_pool = self._pools()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(forward_pool, self._explain, payload)

    def _explain(self, payload: Batch) -> Explanation:
        outputs = self.bundle.forward(payload.pixels, maps=True)
        assessment = self.bundle.trust.assess(outputs)
        explained = assessment.predicted
        size = self.image_size
        sizes = payload.sizes or [(size, size)] * len(payload)
        weight = self.bundle.head_weight
        maps = [
            heatmaps(outputs.maps[i : i + 1], weight, explained[i : i + 1], hw)[0]
            for i, hw in enumerate(sizes)
        ]
        return Explanation(payload, assessment, maps, explained)

    async def postprocess(
        self,
        result: Prediction,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> dict | InferResponse:
        """The answer in the protocol of the request (counted by kind)."""
        classes, request, assessment = (
            self.bundle.class_names,
            result.batch.v2_request,
            result.assessment,
        )
        rejected = int(assessment.not_brain_mri.sum())
        uncertain = int(assessment.uncertain.sum()) - rejected
        for kind, count in (
            ("not_brain_mri", rejected),
            ("uncertain", uncertain),
            ("confident", len(result.batch) - rejected - uncertain),
        ):
            if count:
                ANSWERS.labels(self.name, kind).inc(count)
        if isinstance(result, Explanation):
            return protocol.explain_response(
                assessment, classes, self.model_version, result.heatmaps, result.explained
            )
        if request is not None:
            return protocol.v2_response(request, assessment, classes, self.name, self.model_version)
        return protocol.v1_response(assessment, classes, self.model_version)

    async def _pixels_of(
        self, encoded: Sequence[protocol.Encoded], where: Callable[[int], str]
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Decode and preprocess every image in parallel (with each one's size as sent);
        InvalidInput lists each one that fails, by position."""
        decode_pool, _ = self._pools()
        loop = asyncio.get_running_loop()
        outcomes = await asyncio.gather(
            *(loop.run_in_executor(decode_pool, self._prepare_one, item) for item in encoded),
            return_exceptions=True,
        )
        tensors, sizes, errors = [], [], []
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, ValueError):
                errors.append(f"{where(index)}: {outcome}")
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                tensors.append(outcome[0])
                sizes.append(outcome[1])
        if errors:
            raise protocol.BadRequest(protocol.summarise(errors))
        return torch.stack(tensors), sizes

    def _prepare_one(self, item: protocol.Encoded) -> tuple[torch.Tensor, tuple[int, int]]:
        """One encoded image -> the network's input, exactly as in training (ValueError if
        bad), and the image's (height, width)."""
        image = protocol.decode_encoded(item, self.limits.max_image_pixels)
        return self.bundle.preprocess(image), (image.height, image.width)

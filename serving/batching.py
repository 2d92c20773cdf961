"""Request batching in the server's process: the images of concurrent requests run as one forward
pass, up to ``max_images`` of them or once the oldest has waited ``max_latency_s``.

KServe's batcher sidecar (``spec.predictor.batcher`` in an InferenceService) does the same in
front of the pod; this one needs no sidecar, sees the images rather than the requests, and stays
behind the server's admission limits (:mod:`serving.limits`), which bound what can queue here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, fields

import torch

from brainmri.trust import Assessment


def split_assessment(assessment: Assessment, sizes: list[int]) -> list[Assessment]:
    """One batched :class:`Assessment` back into one per request of ``sizes`` images."""
    parts = {f.name: torch.split(getattr(assessment, f.name), sizes) for f in fields(Assessment)}
    return [
        Assessment(**{name: part[i] for name, part in parts.items()}) for i in range(len(sizes))
    ]


@dataclass
class _Waiting:
    pixels: torch.Tensor
    answer: asyncio.Future[Assessment]


class Batcher:
    """Runs ``assess`` (preprocessed pixels -> :class:`Assessment`) on ``executor`` for the
    images of every request submitted within a window, at most ``max_images`` at once."""

    def __init__(
        self,
        assess: Callable[[torch.Tensor], Assessment],
        executor: Executor,
        max_images: int,
        max_latency_s: float,
    ) -> None:
        if max_images < 1 or max_latency_s <= 0:
            raise ValueError("a batcher needs max_images >= 1 and max_latency_s > 0")
        self.assess, self.executor = assess, executor
        self.max_images, self.max_latency_s = max_images, max_latency_s
        self._waiting: list[_Waiting] = []
        self._timer: asyncio.TimerHandle | None = None
        self.batches_run = 0  # forward passes started (for tests and metrics)

    async def submit(self, pixels: torch.Tensor) -> Assessment:
        """The assessment of ``pixels``, computed in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(pixels, loop.create_future())
        self._waiting.append(waiting)
        if sum(len(w.pixels) for w in self._waiting) >= self.max_images:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_latency_s, self._flush)
        return await waiting.answer

    def _flush(self) -> None:
        """Start one forward pass for the waiting requests that fit in ``max_images`` (the
        first always does); the rest wait for the next window."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, images = [], 0
        while self._waiting and (
            not batch or images + len(self._waiting[0].pixels) <= self.max_images
        ):
            waiting = self._waiting.pop(0)
            batch.append(waiting)
            images += len(waiting.pixels)
        if self._waiting:
            self._timer = asyncio.get_running_loop().call_later(self.max_latency_s, self._flush)
        if batch:
            self.batches_run += 1
            asyncio.ensure_future(self._run(batch))

    async def _run(self, batch: list[_Waiting]) -> None:
        loop = asyncio.get_running_loop()
        pixels = torch.cat([w.pixels for w in batch])
        try:
            assessment = await loop.run_in_executor(self.executor, self.assess, pixels)
        except Exception as err:  # every request of the batch gets the error
            for waiting in batch:
                if not waiting.answer.done():
                    waiting.answer.set_exception(err)
            return
        for waiting, part in zip(
            batch, split_assessment(assessment, [len(w.pixels) for w in batch]), strict=True
        ):
            if not waiting.answer.done():
                waiting.answer.set_result(part)

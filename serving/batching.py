"""Request batching in the server's process: the images of concurrent requests run as one forward
pass, up to ``max_images`` of them or once the oldest has waited ``max_latency_s``.

A batch is formed only when one of the ``workers`` forward passes is free, as Triton's dynamic
batcher does: while every worker is busy, arriving images wait and the next free worker takes
all of them at once (up to ``max_images``), so batches grow with the load instead of queueing
behind each other in small pieces.

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
    since: float  # the event loop's clock when it arrived


class Batcher:
    """Runs ``assess`` (preprocessed pixels -> :class:`Assessment`) on ``executor`` for the
    images of every request submitted within a window, at most ``max_images`` at once and at most
    ``workers`` passes at a time (the executor's threads)."""

    def __init__(
        self,
        assess: Callable[[torch.Tensor], Assessment],
        executor: Executor,
        max_images: int,
        max_latency_s: float,
        workers: int = 1,
    ) -> None:
        if max_images < 1 or max_latency_s <= 0 or workers < 1:
            raise ValueError("a batcher needs max_images >= 1, max_latency_s > 0 and workers >= 1")
        self.assess, self.executor = assess, executor
        self.max_images, self.max_latency_s = max_images, max_latency_s
        self._idle = workers
        self._waiting: list[_Waiting] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Future[None]] = set()  # the loop holds tasks only weakly
        self.batches_run = 0  # forward passes started (for tests and metrics)

    async def submit(self, pixels: torch.Tensor) -> Assessment:
        """The assessment of ``pixels``, computed in a batch with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(pixels, loop.create_future(), loop.time())
        self._waiting.append(waiting)
        self._dispatch()
        return await waiting.answer

    def _dispatch(self) -> None:
        """Start a pass on a free worker for what is waiting once it fills a batch or its oldest
        has waited ``max_latency_s``; else look again when that time comes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        while self._idle and self._waiting:
            images = sum(len(w.pixels) for w in self._waiting)
            wait = self._waiting[0].since + self.max_latency_s - loop.time()
            if images < self.max_images and wait > 0:
                self._timer = loop.call_later(wait, self._dispatch)
                return
            self._start(self._take())

    def _take(self) -> list[_Waiting]:
        """The waiting requests that fit in ``max_images``, oldest first (the first always)."""
        batch, images = [], 0
        while self._waiting and (
            not batch or images + len(self._waiting[0].pixels) <= self.max_images
        ):
            waiting = self._waiting.pop(0)
            batch.append(waiting)
            images += len(waiting.pixels)
        return batch

    def _start(self, batch: list[_Waiting]) -> None:
        self._idle -= 1
        self.batches_run += 1
        task = asyncio.ensure_future(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[None]) -> None:
        self._running.discard(task)
        self._idle += 1
        self._dispatch()

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

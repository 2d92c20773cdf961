"""Request batching: concurrent requests share one forward pass, each gets its own answer, a full
batch goes at once, leftovers wait for the next window, requests arriving while every worker is
busy share the next pass, and an error reaches every request."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brainmri import CLASS_NAMES
from brainmri.backbones import get_backbone
from brainmri.demo_data import synthetic_slice
from brainmri.trust import Assessment, Outputs, Trust
from serving.batching import Batcher, split_assessment
from serving.predictor import BrainMRIModel
from tests.bundles import save_tiny_bundle

pytestmark = pytest.mark.unit


def assess(pixels: torch.Tensor) -> Assessment:
    """A stand-in forward pass: each image's logits are its mean pixel, per class."""
    logits = pixels.mean(dim=(1, 2, 3)).unsqueeze(1) * torch.arange(1.0, 5.0)
    return Trust().assess(Outputs(logits.unsqueeze(0), torch.zeros(len(pixels), 2)))


def test_concurrent_requests_share_one_pass_and_get_their_own_answers() -> None:
    batcher = Batcher(assess, ThreadPoolExecutor(1), max_images=32, max_latency_s=0.05)
    requests = [torch.full((n, 3, 4, 4), float(n)) for n in (1, 2, 3)]

    async def send() -> list[Assessment]:
        return await asyncio.gather(*(batcher.submit(r) for r in requests))

    answers = asyncio.run(send())
    assert batcher.batches_run == 1
    for request, answer in zip(requests, answers, strict=True):
        assert torch.equal(answer.probabilities, assess(request).probabilities)


def test_a_full_batch_goes_at_once_and_the_rest_waits_for_the_next() -> None:
    batcher = Batcher(assess, ThreadPoolExecutor(1), max_images=4, max_latency_s=5.0)

    async def send() -> list[Assessment]:
        return await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(torch.ones(2, 3, 4, 4)) for _ in range(4))), 2.0
        )

    assert len(asyncio.run(send())) == 4 and batcher.batches_run == 2  # no 5 s wait


def test_while_every_worker_is_busy_arrivals_gather_into_the_next_pass() -> None:
    release, sizes = threading.Event(), []

    def slow(pixels: torch.Tensor) -> Assessment:
        sizes.append(len(pixels))
        release.wait(5.0)
        return assess(pixels)

    batcher = Batcher(slow, ThreadPoolExecutor(1), max_images=32, max_latency_s=0.001, workers=1)

    async def send() -> list[Assessment]:
        first = asyncio.ensure_future(batcher.submit(torch.ones(1, 3, 4, 4)))
        while not sizes:  # the only worker is now busy with the first request
            await asyncio.sleep(0.001)
        later = [asyncio.ensure_future(batcher.submit(torch.ones(1, 3, 4, 4))) for _ in range(3)]
        await asyncio.sleep(0.05)  # far past the latency window: still no free worker
        release.set()
        return await asyncio.gather(first, *later)

    assert len(asyncio.run(send())) == 4
    assert sizes == [1, 3]  # the three that came while it was busy shared the next pass


def test_an_error_in_the_pass_reaches_every_request_of_the_batch() -> None:
    def broken(pixels: torch.Tensor) -> Assessment:
        raise RuntimeError("forward failed")

    batcher = Batcher(broken, ThreadPoolExecutor(1), max_images=8, max_latency_s=0.01)

    async def send() -> list[object]:
        calls = (batcher.submit(torch.ones(1, 3, 4, 4)) for _ in range(2))
        return await asyncio.gather(*calls, return_exceptions=True)

    assert [str(e) for e in asyncio.run(send())] == ["forward failed"] * 2


def test_split_assessment_undoes_the_batch() -> None:
    whole = assess(torch.rand(6, 3, 4, 4))
    parts = split_assessment(whole, [1, 3, 2])
    assert [len(p.probabilities) for p in parts] == [1, 3, 2]
    assert torch.equal(torch.cat([p.uncertain for p in parts]), whole.uncertain)


def png(seed: int) -> str:
    buffer = io.BytesIO()
    Image.fromarray(synthetic_slice("glioma", np.random.default_rng(seed), 64)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_server_batches_two_concurrent_requests_into_one_forward_pass(tmp_path: Path) -> None:
    bundle_dir = save_tiny_bundle(tmp_path / "m", image_size=32, seed=0)
    model = BrainMRIModel("m", str(bundle_dir), device="cpu", max_batch_latency_ms=100)
    model.load()
    passes: list[int] = []
    head = model.bundle.model.get_submodule(get_backbone("tiny_cnn").head)
    head.register_forward_hook(lambda _m, inputs, _o: passes.append(len(inputs[0])))
    bodies = [
        {"instances": [{"image_bytes": {"b64": png(s)}} for s in seeds]} for seeds in ([1], [2, 3])
    ]

    async def send() -> list[dict]:
        return [r for r, _ in await asyncio.gather(*(model(b, headers={}) for b in bodies))]

    answers = asyncio.run(send())
    model.stop()
    assert passes == [3]  # one forward pass for the three images of the two requests
    assert [len(a["predictions"]) for a in answers] == [1, 2]
    alone = BrainMRIModel("m", str(bundle_dir), device="cpu")
    alone.load()
    single, _ = asyncio.run(alone(bodies[1], headers={}))
    assert [p["label"] for p in single["predictions"]] == [
        p["label"] for p in answers[1]["predictions"]
    ]
    for ours, theirs in zip(single["predictions"], answers[1]["predictions"], strict=True):
        for name in CLASS_NAMES:
            assert ours["probabilities"][name] == pytest.approx(
                theirs["probabilities"][name], abs=1e-6
            )


def test_batching_widens_the_default_serving_slots_to_a_batch_per_worker() -> None:
    from types import SimpleNamespace

    from serving.__main__ import build_parser, default_inflight

    workers = SimpleNamespace(forward_workers=2)
    args = build_parser().parse_args(["--model_dir", "/m"])
    assert args.max_batch_latency_ms == 0 and default_inflight(args, workers) == 1
    args = build_parser().parse_args(["--model_dir", "/m", "--max_batch_latency_ms", "5"])
    assert default_inflight(args, workers) == 2 * args.max_batch_size

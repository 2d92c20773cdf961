"""Equivalence is a test: on the held-out split of a trained demo model every fp32 runtime agrees
with eager PyTorch on the labels (>= 99.9 %) and within 1e-3 in probability, and an INT8 network
quantised from the bundle is judged by its paired accuracy (McNemar counts), kept only within
0.1 point. The bars themselves are checked on constructed answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from brainmri import CLASS_NAMES
from brainmri.dataset import ImageSet, load_image_set
from brainmri.model import CHECKSUMS_FILE, ModelBundle
from brainmri.runtimes import INT8_FILES
from components.runtime_check import (
    LABEL_AGREEMENT,
    PROBABILITY_TOLERANCE,
    compare_probabilities,
    compare_runtimes,
    quantise_bundle,
)
from tests.bundles import train_demo_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, ImageSet]]:
    """The demo model as ``make run`` trains it (with its ONNX export), and its splits' images."""
    work = tmp_path_factory.mktemp("runtime-check")
    split = train_demo_model(work, 96, seed=3)
    bundle = ModelBundle.load(work / "model")
    sets = {
        name: load_image_set(
            work / "dataset", split[split["split"] == name], list(CLASS_NAMES), bundle.preprocess
        )
        for name in ("train", "test")
    }
    return work / "model", sets


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_fp32_runtimes_answer_the_held_out_split_as_eager_pytorch(
    trained: tuple[Path, dict[str, ImageSet]], runtime: str
) -> None:
    directory, sets = trained
    eager, served = ModelBundle.load(directory), ModelBundle.load(directory, runtime=runtime)
    assert served.runtime_name == runtime  # training exported the network: no fallback
    test = sets["test"]
    agreement = compare_runtimes(eager, served, test.images, test.labels)
    assert agreement.images == len(test) >= 30
    assert agreement.label_agreement >= LABEL_AGREEMENT
    assert agreement.max_probability_difference <= PROBABILITY_TOLERANCE
    assert agreement.equivalent and agreement.paired.first_errors == agreement.paired.second_errors


def test_an_int8_network_is_added_to_the_bundle_and_judged_by_paired_accuracy(
    trained: tuple[Path, dict[str, ImageSet]], tmp_path: Path
) -> None:
    directory, sets = trained
    copy = Path(shutil.copytree(directory, tmp_path / "model"))
    path = quantise_bundle(copy, sets["train"].images, subset_size=20)
    assert path.name == INT8_FILES[0] and all((copy / name).is_file() for name in INT8_FILES)
    assert set(INT8_FILES) <= set(json.loads((copy / CHECKSUMS_FILE).read_text()))  # verified
    int8 = ModelBundle.load(copy, runtime="openvino-int8")
    assert int8.runtime_name == "openvino-int8"
    test = sets["test"]
    agreement = compare_runtimes(ModelBundle.load(copy), int8, test.images, test.labels)
    report = agreement.to_dict()
    paired = report["paired"]
    assert report["candidate"] == "openvino-int8" and report["images"] == len(test)
    counts = ("both_right", "only_first_right", "only_second_right", "both_wrong")
    assert sum(paired[name] for name in counts) == len(test) and "mcnemar_p" in paired
    assert agreement.quantisation_acceptable == (agreement.accuracy_loss <= 0.001)


def test_the_bars_count_labels_probabilities_and_paired_errors() -> None:
    labels = torch.zeros(1000, dtype=torch.long)
    reference = torch.tensor([[0.9, 0.1, 0.0, 0.0]]).repeat(1000, 1)
    one_flip, two_flips = reference.clone(), reference.clone()
    one_flip[0] = torch.tensor([0.1, 0.9, 0.0, 0.0])
    two_flips[:2] = torch.tensor([0.1, 0.9, 0.0, 0.0])
    first, second = (compare_probabilities(reference, c, labels) for c in (one_flip, two_flips))
    assert first.label_agreement == pytest.approx(0.999) and second.label_agreement < 0.999
    assert not first.equivalent  # the flipped answer moved its probabilities by 0.8
    assert first.quantisation_acceptable and not second.quantisation_acceptable  # 0.1 / 0.2 pt
    assert (first.paired.only_first_right, first.paired.only_second_right) == (1, 0)
    nudged = reference + torch.tensor([5e-4, -5e-4, 0.0, 0.0])
    assert compare_probabilities(reference, nudged, labels).equivalent
    assert not compare_probabilities(reference, reference + 2e-3, labels).equivalent

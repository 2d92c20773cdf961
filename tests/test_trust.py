"""Calibration, conformal prediction sets, the uncertainty flag, the OOD detector and the
activation maps of :mod:`brainmri.trust`, on synthetic logits and a tiny network."""

from pathlib import Path

import numpy as np
import pytest
import torch

from brainmri.backbones import get_backbone
from brainmri.model import ModelBundle, build_model
from brainmri.trust import (
    TRUST_FILE,
    OODDetector,
    Outputs,
    Trust,
    fit_confidence_threshold,
    fit_ood,
    fit_set_quantile,
    fit_temperature,
    fit_trust,
    heatmaps,
    hottest_box,
    hottest_point,
    prediction_sets,
)

pytestmark = pytest.mark.unit
CLASSES = ["glioma", "meningioma", "notumor", "pituitary"]


def overconfident(n: int, scale: float, seed: int = 0) -> tuple[Outputs, torch.Tensor]:
    """Logits ``scale`` times too sharp: labels drawn from softmax(true logits)."""
    generator = torch.Generator().manual_seed(seed)
    true_logits = torch.randn(n, 4, generator=generator) * 1.5
    labels = torch.multinomial(torch.softmax(true_logits, 1), 1, generator=generator).squeeze(1)
    features = torch.randn(n, 8, generator=generator) + labels.unsqueeze(1).float()
    return Outputs((true_logits * scale).unsqueeze(0), features), labels


def test_temperature_undoes_overconfidence() -> None:
    outputs, labels = overconfident(4000, scale=3.0)
    assert fit_temperature(outputs, labels) == pytest.approx(3.0, rel=0.1)


def test_conformal_sets_hold_the_true_class_at_the_stated_coverage() -> None:
    val, val_labels = overconfident(2000, 1.0, seed=1)
    test, test_labels = overconfident(20000, 1.0, seed=2)
    for coverage in (0.8, 0.9, 0.95):
        quantile = fit_set_quantile(val.probabilities(), val_labels, coverage)
        sets = prediction_sets(test.probabilities(), quantile)
        covered = float(sets[torch.arange(len(test_labels)), test_labels].float().mean())
        assert abs(covered - coverage) < 0.015, (coverage, covered)


def test_conformal_sets_are_mapies() -> None:
    from mapie.classification import SplitConformalClassifier

    from brainmri.trust import _given_probabilities

    val, labels = overconfident(500, 1.0, seed=3)
    proba = val.probabilities().numpy()
    mapie = SplitConformalClassifier(
        _given_probabilities(4), confidence_level=0.9, conformity_score="lac", prefit=True
    ).conformalize(proba, labels.numpy())
    quantile = fit_set_quantile(val.probabilities(), labels, 0.9)
    ours = prediction_sets(val.probabilities(), quantile).numpy()
    assert (ours == mapie.predict_set(proba)[1][:, :, 0]).all()


def test_the_confidence_threshold_flags_at_most_the_stated_share_of_right_answers() -> None:
    generator = torch.Generator().manual_seed(4)
    labels = torch.randint(0, 4, (1000,), generator=generator)
    logits = torch.randn(1000, 4, generator=generator) + 4 * torch.eye(4)[labels]  # mostly right
    proba = torch.softmax(logits, dim=1)
    right = proba.argmax(1) == labels
    sets = prediction_sets(proba, fit_set_quantile(proba, labels, 0.99))
    threshold = fit_confidence_threshold(proba, labels, sets, 0.05)
    flagged = ((sets.sum(1) != 1) | (proba.max(1).values < threshold))[right]
    assert 0.5 < threshold < 1 and 0.04 < float(flagged.float().mean()) <= 0.05
    # at 90 % coverage this 99 %-accurate model leaves 9 % of its right answers an empty set:
    # they are flagged already, so no confidence threshold is added
    sets = prediction_sets(proba, fit_set_quantile(proba, labels, 0.9))
    assert float((sets.sum(1) == 0)[right].float().mean()) > 0.05
    assert fit_confidence_threshold(proba, labels, sets, 0.05) == 0.0


def test_ood_detectors_reject_far_features_and_few_validation_ones() -> None:
    train, train_labels = overconfident(2000, 1.0, seed=5)
    val, _ = overconfident(500, 1.0, seed=6)
    far = Outputs(torch.full((1, 50, 4), -5.0), torch.randn(50, 8) * 0.1 + 30)
    detector = fit_ood("mahalanobis", train, train_labels, val, 0.01)
    assert float((detector.scores(val) > detector.threshold).float().mean()) <= 0.01
    assert bool((detector.scores(far) > detector.threshold).all())
    flat = fit_ood("energy", train, train_labels, val, 0.01)  # low logits: high energy
    assert float((flat.scores(far) > flat.threshold).float().mean()) > 0.5


def test_the_fitted_trust_is_saved_in_the_bundle_and_applied(tmp_path: Path) -> None:
    train, train_labels = overconfident(400, 3.0, seed=7)
    val, val_labels = overconfident(400, 3.0, seed=8)
    probe = Outputs(torch.zeros(1, 40, 4), torch.randn(40, 8) * 0.1 + 30)
    trust = fit_trust(train, train_labels, val, val_labels, probe, 0.9, 0.05, 0.02)
    assert trust.temperature == pytest.approx(3.0, rel=0.2)
    assert set(trust.fit_report["probe_auroc"]) == {"energy", "mahalanobis"}
    trust.ood = fit_ood("mahalanobis", train, train_labels, val, 0.02)  # one with tensors
    model = build_model("tiny_cnn", 4).eval()
    bundle = ModelBundle(model, "tiny_cnn", CLASSES, get_backbone("tiny_cnn").preprocess(32))
    bundle.trust = trust
    bundle.save(tmp_path)
    assert (tmp_path / TRUST_FILE).is_file()
    loaded = ModelBundle.load(tmp_path)
    assert loaded.trust.temperature == trust.temperature
    assert loaded.trust.set_quantile == trust.set_quantile
    assert torch.equal(loaded.trust.ood.precision, trust.ood.precision)
    batch = torch.randn(5, 3, 32, 32)
    with torch.inference_mode():
        logits = model(batch)
    expected = torch.softmax(logits / trust.temperature, dim=1)
    assert torch.allclose(loaded.predict_proba(batch), expected, atol=1e-6)
    (tmp_path / TRUST_FILE).write_bytes(b"tampered")
    with pytest.raises(ValueError, match="trust.pt does not match its checksum"):
        ModelBundle.load(tmp_path)


def test_a_bundle_without_trust_answers_as_before() -> None:
    outputs, _ = overconfident(20, 1.0)
    assessment = Trust().assess(outputs)
    assert torch.equal(assessment.probabilities, outputs.probabilities())
    assert (assessment.prediction_sets.sum(1) == 1).all() and not assessment.uncertain.any()
    assert assessment.ood_scores.isnan().all() and not assessment.not_brain_mri.any()


def test_rejected_images_are_uncertain_and_not_brain_mri() -> None:
    outputs, _ = overconfident(10, 1.0)
    trust = Trust(ood=OODDetector("energy", threshold=-1e9))  # rejects everything
    assessment = trust.assess(outputs)
    assert assessment.not_brain_mri.all() and assessment.uncertain.all()


def test_activation_maps_equal_captums_grad_cam() -> None:
    """For a global-average pool and a linear head, plain CAM is Grad-CAM (up to scale)."""
    from captum.attr import LayerGradCam

    torch.manual_seed(0)
    model = build_model("tiny_cnn", 4).eval()
    bundle = ModelBundle(model, "tiny_cnn", CLASSES, get_backbone("tiny_cnn").preprocess(64))
    batch = torch.randn(3, 3, 64, 64)
    outputs = bundle.forward(batch, maps=True)
    target = outputs.probabilities().argmax(1)
    ours = heatmaps(outputs.maps, bundle.head_weight, target, tuple(outputs.maps.shape[2:]))
    last_block = model.get_submodule("3")  # its output is the pool's input
    grad_cam = LayerGradCam(model, last_block).attribute(
        batch, target=target, relu_attributions=True
    )
    grad_cam = grad_cam.squeeze(1)
    grad_cam = grad_cam / grad_cam.flatten(1).max(1).values.view(-1, 1, 1)
    assert torch.allclose(ours, grad_cam, atol=1e-5)


def test_the_hottest_box_surrounds_the_peak() -> None:
    heat = torch.zeros(40, 50)
    heat[10:20, 30:45] = 0.85
    heat[8:22, 28:47] = torch.maximum(heat[8:22, 28:47], torch.tensor(0.5))  # too cool: outside
    heat[14, 36] = 1.0
    heat[30:35, 2:6] = 0.9  # another hot region, not connected to the peak
    assert hottest_point(heat) == (36, 14)
    assert hottest_box(heat) == (30, 10, 45, 20)
    assert np.isclose(float(heat.max()), 1.0)


@pytest.mark.parametrize("backbone", ["tiny_cnn", "efficientnet_lite0", "resnet18"])
def test_one_forward_pass_gives_the_networks_logits_features_and_maps(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(backbone, 4).eval()
    bundle = ModelBundle(
        model, backbone, CLASSES, get_backbone(backbone).preprocess(64), test_time_flip=True
    )
    batch = torch.randn(3, 3, 64, 64)
    outputs = bundle.forward(batch, maps=True)
    with torch.inference_mode():
        views = torch.softmax(model(torch.cat([batch, batch.flip(-1)])), dim=1).view(2, 3, 4)
    assert torch.allclose(outputs.probabilities(), views.mean(0), atol=1e-6)
    assert outputs.features.shape[0] == 3 and outputs.maps.shape[:2] == outputs.features.shape


def test_concurrent_forward_passes_never_mix_their_maps() -> None:
    """The server runs several forward passes of one network at once (--forward_workers)."""
    from concurrent.futures import ThreadPoolExecutor

    model = build_model("tiny_cnn", 4).eval()
    bundle = ModelBundle(model, "tiny_cnn", CLASSES, get_backbone("tiny_cnn").preprocess(64))
    batches = [torch.randn(n, 3, 64, 64) for n in (1, 2, 3, 4) * 6]
    alone = [bundle.forward(b, maps=True) for b in batches]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda b: bundle.forward(b, maps=True), batches))
    for one, other in zip(alone, together, strict=True):
        assert torch.allclose(one.logits, other.logits, atol=1e-5)
        assert torch.allclose(one.maps, other.maps, atol=1e-5)

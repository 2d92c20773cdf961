"""Training (two phases, schedules, early stopping, checkpoints and resume) and evaluation on
synthetic images, without KFP."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from brainmri.images import PreprocessConfig
from brainmri.model import ModelBundle, build_model
from brainmri.storage import ObjectStore, S3Uri
from components import train as train_module
from components.checkpoint import CorruptCheckpointWarning
from components.config import AugmentConfig, TrainConfig
from components.evaluate import evaluate_model
from components.report import render_report
from components.train import TrainRun, _phase_optimizer, train_model

TINY = {"backbone": "tiny_cnn", "image_size": 32, "batch_size": 16}


def fit(
    prepared: tuple[Path, Path],
    out: Path,
    config: TrainConfig,
    augment: AugmentConfig | None = None,
    checkpoint_uri: str | None = None,
):
    """Train on the shared prepared demo set (no progress bars)."""
    dataset, split_csv = prepared
    return train_model(TrainRun(dataset, split_csv, out, config, augment, checkpoint_uri), False)


def test_train_then_evaluate(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, split_csv = prepared
    config = TrainConfig(epochs=2, **TINY)
    result = fit(prepared, tmp_path / "model", config, AugmentConfig())
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert {h["phase"] for h in result.history} == {"full"}  # tiny_cnn: nothing to freeze
    assert result.train_images_per_s > 0 and result.resumed_from_epoch is None
    bundle = ModelBundle.load(tmp_path / "model")
    assert bundle.preprocess.image_size == 32
    meta = bundle.metadata
    assert (
        meta["train_config"]["epochs"] == 2 and meta["train_config"]["peak_learning_rate"] == 0.01
    )
    assert meta["data"]["split_sizes"] == {"train": 24, "val": 12, "test": 12}
    assert len(meta["data"]["split_fingerprint"]) == 64 and meta["augment"]["crop_scale"] == 0.85
    assert len(meta["data"]["dataset_fingerprint"] or "") == 64  # from ingest's report
    evaluation = evaluate_model(tmp_path / "model", dataset, split_csv)
    assert evaluation.num_images == 12 and sum(map(sum, evaluation.confusion)) == 12
    correct = sum(evaluation.confusion[k][k] for k in range(4))
    assert evaluation.accuracy == pytest.approx(correct / 12)  # accuracy is the diagonal's share
    recalls = [s.recall for s in evaluation.per_class.values()]
    assert evaluation.balanced_accuracy == pytest.approx(sum(recalls) / 4)
    assert set(evaluation.per_class) == set(bundle.class_names)
    report = render_report(evaluation)
    assert "## Model card" in report and "tiny_cnn" in report
    # calibration, sets, flags and the OOD detector are fitted on val and saved with the model
    assert (tmp_path / "model" / "model.onnx").is_file()  # exported for the serving runtimes
    trust = bundle.trust
    assert trust.fit_report["validation_images"] == 12 and trust.fit_report["training_images"] == 24
    assert trust.temperature > 0 and trust.set_quantile is not None and trust.ood is not None
    scores = evaluation.trust
    assert scores.temperature == trust.temperature and scores.overall.images == 12
    assert 0 <= scores.after.ece <= 1 and set(scores.per_class) == set(bundle.class_names)
    assert {"ece", "ece_before", "set_coverage", "mean_set_size"} <= set(
        evaluation.scalar_metrics()
    )
    assert {"prediction_set", "uncertain", "ood_score"} <= set(evaluation.predictions.columns)
    assert "## Calibration and uncertainty" in report and "reliability diagram" in report
    assert "## Where the evidence is" in report and len(evaluation.explained) >= 1


def test_pretrained_backbone_trains_head_then_whole_network(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    config = TrainConfig(
        **{**TINY, "backbone": "efficientnet_lite0"}, epochs=2, head_epochs=1, schedule="cosine"
    )
    result = fit(prepared, tmp_path / "model", config)
    assert [h["phase"] for h in result.history] == ["head", "full"]
    bundle = ModelBundle.load(tmp_path / "model")
    assert bundle.metadata["pretrained_weights"].endswith("efficientnet-lite0-57934424.pth")
    assert bundle.preprocess.mean[0] == pytest.approx(127 / 255)  # the backbone's normalisation


def test_head_phase_leaves_at_least_one_whole_network_epoch() -> None:
    lite = {"backbone": "efficientnet_lite0"}
    assert TrainConfig(epochs=1, head_epochs=1, **lite).head_only_epochs == 0
    assert TrainConfig(epochs=5, head_epochs=2, **lite).head_only_epochs == 2
    assert TrainConfig(epochs=5, head_epochs=2, pretrained=False, **lite).head_only_epochs == 0
    assert TrainConfig(backbone="tiny_cnn", epochs=5, head_epochs=2).head_only_epochs == 0


def test_head_phase_trains_only_the_head() -> None:
    model = build_model("efficientnet_lite0", 4)
    config = TrainConfig(backbone="efficientnet_lite0", epochs=3)
    optimizer, _ = _phase_optimizer(model, "head", config, steps=10)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    assert sum(p.numel() for p in trainable) == 1280 * 4 + 4
    assert sum(p.requires_grad for p in model.parameters()) == 2
    optimizer, _ = _phase_optimizer(model, "full", config, steps=10)
    assert all(p.requires_grad for p in model.parameters())


def test_same_seed_same_training(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    config = TrainConfig(epochs=1, **TINY)
    runs = [fit(prepared, tmp_path / f"m{i}", config, AugmentConfig()) for i in range(2)]
    keep = ("train_loss", "val_loss", "val_accuracy")
    assert [{k: h[k] for k in keep} for h in runs[0].history] == [
        {k: h[k] for k in keep} for h in runs[1].history
    ]


class Crash(RuntimeError):
    pass


def crash_on_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> list[int]:
    """Make training fail in ``epoch`` (a killed pod); returns the epochs trained."""
    real, seen = train_module.train_one_epoch, []

    def train(*args: object, **kwargs: object) -> object:
        seen.append(len(seen) + 1)
        if len(seen) == epoch:
            raise Crash(f"killed in epoch {epoch}")
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_one_epoch", train)
    return seen


def test_a_retried_run_resumes_from_the_minio_checkpoint(
    prepared: tuple[Path, Path],
    tmp_path: Path,
    store: ObjectStore,
    bucket: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = TrainConfig(epochs=3, **TINY)
    uri = f"s3://{bucket}/checkpoints/run-1"
    crash_on_epoch(monkeypatch, 3)
    with pytest.raises(Crash):
        fit(prepared, tmp_path / "m", config, checkpoint_uri=uri)
    assert store.exists(S3Uri.parse(uri).child("last.pt"))

    trained = crash_on_epoch(monkeypatch, 99)
    result = fit(prepared, tmp_path / "m", config, checkpoint_uri=uri)
    assert result.resumed_from_epoch == 2 and trained == [1]  # only epoch 3 ran again
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert ModelBundle.load(tmp_path / "m").metadata["resumed_from_epoch"] == 2

    # a finished checkpoint: the retry only rewrites the bundle
    again = fit(prepared, tmp_path / "m2", config, checkpoint_uri=uri)
    assert again.resumed_from_epoch == 3 and trained == [1]
    assert again.best_val_accuracy == result.best_val_accuracy


def test_a_checkpoint_of_another_configuration_is_not_resumed(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    folder = str(tmp_path / "ckpt")
    fit(prepared, tmp_path / "a", TrainConfig(epochs=1, **TINY), checkpoint_uri=folder)
    other = TrainConfig(epochs=1, learning_rate=0.001, **TINY)
    result = fit(prepared, tmp_path / "b", other, checkpoint_uri=folder)
    assert result.resumed_from_epoch is None


def test_a_nan_loss_stops_the_run_before_anything_is_saved(
    prepared: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, epochs = train_module.train_one_epoch, []

    def diverge_in_epoch_2(*args: object, **kwargs: object) -> tuple[int, int, float]:
        seen, correct, loss_sum = real(*args, **kwargs)
        epochs.append(1)
        return seen, correct, float("nan") if len(epochs) == 2 else loss_sum

    monkeypatch.setattr(train_module, "train_one_epoch", diverge_in_epoch_2)
    folder = tmp_path / "ckpt"
    with pytest.raises(
        train_module.DivergedError, match="train_loss = nan in epoch 2.*Lower learning_rate"
    ):
        fit(prepared, tmp_path / "m", TrainConfig(epochs=3, **TINY), checkpoint_uri=str(folder))
    assert not (tmp_path / "m").exists()  # no bundle
    saved = torch.load(folder / "last.pt", weights_only=True)
    assert saved["epoch"] == 1  # the diverged epoch was never checkpointed


@pytest.mark.parametrize("garbage", [b"not a checkpoint", b"PK\x03\x04truncated"])
def test_a_corrupt_checkpoint_restarts_training_with_a_warning(
    prepared: tuple[Path, Path], tmp_path: Path, garbage: bytes
) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "last.pt").write_bytes(garbage)
    with pytest.warns(CorruptCheckpointWarning, match="starts from scratch"):
        result = fit(prepared, tmp_path / "m", TrainConfig(epochs=1, **TINY), None, str(folder))
    assert result.resumed_from_epoch is None and len(result.history) == 1
    assert torch.load(folder / "last.pt", weights_only=True)["finished"]  # overwritten


def test_early_stopping_on_validation(
    prepared: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(train_module, "evaluate", lambda *a, **k: (0.5, 1.0))
    config = TrainConfig(epochs=8, patience=2, **TINY)
    result = fit(prepared, tmp_path / "m", config)
    # epoch 1 is best; stale after 2 and 3, but no stop before half of the 8 epochs are done
    assert result.stopped_early and len(result.history) == 4 and result.best_epoch == 1


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"head_epochs": -1}, "head_epochs"),
        ({"backbone": "vgg99"}, "unknown backbone"),
        ({"schedule": "step"}, "schedule"),
        ({"image_size": 16}, "image_size"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"head_learning_rate_scale": 0}, "head_learning_rate_scale"),
    ],
)
def test_train_config_is_validated(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**changes)


def test_saved_bundle_predicts_like_the_trained_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 4).eval()
    bundle = ModelBundle(model, "tiny_cnn", ["a", "b", "c", "d"], PreprocessConfig(image_size=32))
    batch = torch.rand(2, 3, 32, 32)
    expected = bundle.predict_proba(batch)
    loaded = ModelBundle.load(bundle.save(tmp_path))
    assert torch.allclose(loaded.predict_proba(batch), expected, atol=1e-6)


def test_unknown_backbone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'vgg99'"):
        build_model("vgg99", 4)


def test_missing_model_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a saved model"):
        ModelBundle.load(tmp_path)


def learning_rates(optimizer: torch.optim.Optimizer, scheduler, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_cosine_holds_the_head_rate_then_warms_up_and_decays_to_zero() -> None:
    model = build_model("efficientnet_lite0", 4)
    config = TrainConfig(
        backbone="efficientnet_lite0", schedule="warmup_cosine", head_learning_rate_scale=10
    )
    head = learning_rates(*_phase_optimizer(model, "head", config, steps=20), steps=20)
    assert head == pytest.approx([10 * config.peak_learning_rate] * 20)  # constant, scaled
    optimizer, scheduler = _phase_optimizer(model, "full", config, steps=100)
    whole = learning_rates(optimizer, scheduler, steps=100)
    warmup = round(train_module.WARMUP_SHARE * 100)
    assert whole[0] == pytest.approx(0.01 * config.peak_learning_rate)
    assert whole[warmup] == pytest.approx(config.peak_learning_rate)  # the peak after warm-up
    assert all(a >= b for a, b in zip(whole[warmup:], whole[warmup + 1 :], strict=False))
    assert scheduler.get_last_lr()[0] == pytest.approx(0, abs=1e-12)  # cosine to zero
    assert {g["betas"] for g in optimizer.param_groups} == {(0.9, 0.999)}  # never cycled


def test_the_moving_average_is_kept_when_it_scores_better_and_resumes(
    prepared: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrainConfig(epochs=3, ema_decay=0.5, **TINY)
    folder = str(tmp_path / "ckpt")
    crash_on_epoch(monkeypatch, 3)
    with pytest.raises(Crash):
        fit(prepared, tmp_path / "m", config, checkpoint_uri=folder)
    monkeypatch.undo()
    result = fit(prepared, tmp_path / "m", config, checkpoint_uri=folder)
    assert result.resumed_from_epoch == 2
    assert all({"ema_val_accuracy", "ema_val_loss"} <= set(h) for h in result.history)
    best = result.history[result.best_epoch - 1]
    raw, averaged = (
        (best["val_accuracy"], -best["val_loss"]),
        (
            best["ema_val_accuracy"],
            -best["ema_val_loss"],
        ),
    )
    assert result.selected_weights == ("ema" if averaged > raw else "raw")
    assert ModelBundle.load(tmp_path / "m").metadata["selected_weights"] == result.selected_weights


def test_without_ema_the_raw_weights_are_kept(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    result = fit(prepared, tmp_path / "m", TrainConfig(epochs=1, ema_decay=0.0, **TINY))
    assert result.selected_weights == "raw" and "ema_val_accuracy" not in result.history[0]


def test_the_precision_that_ran_is_recorded(
    prepared: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With cpu_bf16: bf16 autocast on a CPU that computes bf16 natively, fp32 on one that does
    not; without it, fp32."""
    config = TrainConfig(epochs=1, cpu_bf16=True, **TINY)
    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: True)
    assert fit(prepared, tmp_path / "a", config).precision == "bf16 autocast"
    assert fit(prepared, tmp_path / "b", replace(config, cpu_bf16=False)).precision == "fp32"
    monkeypatch.setattr(train_module, "cpu_has_bf16", lambda: False)
    assert fit(prepared, tmp_path / "c", config).precision == "fp32"


def test_test_time_flip_is_recorded_in_the_bundle_and_averages_mirror_images(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    fit(prepared, tmp_path / "m", TrainConfig(epochs=1, test_time_flip=True, **TINY))
    bundle = ModelBundle.load(tmp_path / "m")
    assert bundle.test_time_flip
    batch = torch.rand(3, 3, 32, 32)
    temperature = bundle.trust.temperature  # fitted on val after training, applied to both
    with torch.inference_mode():
        plain, mirrored = (
            torch.softmax(bundle.model(b) / temperature, dim=1) for b in (batch, batch.flip(-1))
        )
    assert torch.allclose(bundle.predict_proba(batch), (plain + mirrored) / 2, atol=1e-6)
    assert torch.allclose(bundle.predict_proba(batch), bundle.predict_proba(batch.flip(-1)))


def test_batched_augmentation_runs_in_the_training_loop_not_the_loader(
    prepared: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = train_module.BatchAugment.__call__

    def counted(self, images: torch.Tensor) -> torch.Tensor:
        calls.append(len(images))
        return real(self, images)

    monkeypatch.setattr(train_module.BatchAugment, "__call__", counted)
    augment = AugmentConfig(batched=True)
    result = fit(prepared, tmp_path / "m", TrainConfig(epochs=1, **TINY), augment)
    assert sum(calls) == result.history[0]["train_images"]  # every training image, in batches
    assert ModelBundle.load(tmp_path / "m").metadata["augment"]["batched"] is True

"""Training and evaluation on synthetic images, without KFP."""

from pathlib import Path

import pytest
import torch

from brainmri.dataset import MANIFEST_FILE, read_manifest
from brainmri.model import ModelBundle, build_model
from components.augment import AugmentConfig
from components.evaluate import evaluate_model
from components.ingest import ingest_dataset
from components.split import split_manifest
from components.train import TrainConfig, train_model


@pytest.fixture(scope="module")
def prepared(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("prepared")
    ingest_dataset(str(demo_dir), out / "dataset", progress=False)
    split_manifest(read_manifest(out / "dataset" / MANIFEST_FILE), 0.25, 0.25).to_csv(
        out / "split.csv", index=False
    )
    return out / "dataset", out / "split.csv"


def test_train_then_evaluate(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    dataset, split_csv = prepared
    config = TrainConfig(epochs=2, image_size=32, batch_size=16)
    result = train_model(
        dataset, split_csv, tmp_path / "model", config, AugmentConfig(), progress=False
    )
    assert [h["epoch"] for h in result.history] == [1, 2]
    bundle = ModelBundle.load(tmp_path / "model")
    assert bundle.preprocess.image_size == 32
    assert bundle.metadata["train_config"]["epochs"] == 2
    evaluation = evaluate_model(tmp_path / "model", dataset, split_csv)
    assert evaluation.num_images == 12 and 0.0 <= evaluation.accuracy <= 1.0
    assert sum(map(sum, evaluation.confusion)) == 12


def test_saved_bundle_predicts_like_the_trained_model(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model("tiny_cnn", 4).eval()
    from brainmri.images import PreprocessConfig

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

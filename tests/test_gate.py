"""The champion/challenger gate: the decision on paired answers, and the champion fetched from
the models bucket and scored on the test images neither model trained on (real local S3)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brainmri.model import ModelBundle
from brainmri.registry import production_record_uri
from brainmri.storage import ObjectStore, S3Uri
from components.gate import (
    Comparison,
    fetch_champion,
    gate_decision,
    gate_model,
    render_gate_report,
)
from components.split import HASH_PREFIX, load_split
from components.statistics import compare_paired
from tests.test_evaluate import constant_bundle

CLASSES = ("glioma", "meningioma", "notumor", "pituitary")


def comparison(
    challenger_wrong: dict[str, int], champion_wrong: dict[str, int], per_class: int = 100
) -> Comparison:
    """Both models on the same 4 x ``per_class`` images, wrong on the first N of each class."""
    truth = np.repeat(CLASSES, per_class)
    rank = np.tile(np.arange(per_class), len(CLASSES))

    def right(wrong: dict[str, int]) -> np.ndarray:
        return rank >= np.array([wrong.get(c, 0) for c in truth])

    first, second = right(challenger_wrong), right(champion_wrong)

    def recalls(correct: np.ndarray) -> dict[str, float]:
        return {c: float(correct[truth == c].mean()) for c in CLASSES}

    return Comparison(
        len(truth), 0, compare_paired(first, second), recalls(first), recalls(second), "test"
    )


@pytest.mark.parametrize(
    ("accuracy", "compared", "promote", "why"),
    [
        (0.95, None, True, "no production model"),  # first model ever: the threshold alone
        (0.85, None, False, "threshold"),
        (0.85, comparison({}, {"glioma": 50}), False, "threshold"),  # even vs a weak champion
        (0.95, comparison({"glioma": 4}, {"glioma": 6}), True, "within 2 allowed"),  # better
        (0.95, comparison({"glioma": 6}, {"glioma": 4}), True, "within 2 allowed"),  # 2 extra
        (0.95, comparison({"glioma": 7}, {"glioma": 4}), False, "3 more, allowed 2"),
        (0.95, comparison({}, {}), True, "within"),  # ties pass
    ],
)
def test_gate_decision(
    accuracy: float, compared: Comparison | None, promote: bool, why: str
) -> None:
    decision = gate_decision(accuracy, 0.9, compared, tolerance=0.005, champion_version="v1")
    assert decision.promote is promote and why in decision.reason
    assert decision.challenger_accuracy == accuracy
    if compared is not None:
        assert decision.champion_accuracy == compared.champion_accuracy
        assert decision.compared["images"] == 400 and "mcnemar_p" in decision.compared


def test_better_overall_but_worse_on_one_class_is_refused() -> None:
    """Fewer errors in total, but meningioma recall 4 points below production: kept out."""
    compared = comparison(
        {"meningioma": 6}, {"glioma": 5, "notumor": 5, "pituitary": 5, "meningioma": 2}
    )
    assert compared.paired.first_errors < compared.paired.second_errors
    decision = gate_decision(0.98, 0.9, compared, max_recall_drop=0.02, champion_version="v1")
    assert not decision.promote
    assert "meningioma recall drops by 0.0400" in decision.reason
    assert decision.compared["challenger_recall"]["meningioma"] == 0.94
    relaxed = gate_decision(0.98, 0.9, compared, max_recall_drop=0.05, champion_version="v1")
    assert relaxed.promote


def test_an_unscorable_champion_is_compared_by_its_recorded_accuracy() -> None:
    kept = gate_decision(0.95, 0.9, None, 0.01, recorded_champion_accuracy=0.97)
    assert not kept.promote and "unpaired" in kept.reason and kept.champion_accuracy == 0.97
    assert gate_decision(0.96, 0.9, None, 0.01, recorded_champion_accuracy=0.97).promote


def test_gate_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="not a fraction"):
        gate_decision(1.5, 0.9)
    with pytest.raises(ValueError, match="recorded_champion_accuracy"):
        gate_decision(0.9, 0.9, recorded_champion_accuracy=-0.1)
    with pytest.raises(ValueError, match="tolerance"):
        gate_decision(0.9, 0.9, tolerance=-0.01)


def test_the_gate_report_shows_verdict_scores_and_paired_counts() -> None:
    decision = gate_decision(0.97, 0.9, comparison({"glioma": 3}, {"glioma": 1}))
    text = render_gate_report(decision)
    assert text.startswith("# Gate: PROMOTE")
    assert "both right / only challenger / only champion / both wrong" in text
    assert "397 / 0 / 2 / 1" in text and "McNemar" in text


# -- with a real bucket --------------------------------------------------------------------------
def challenger_predictions(split_csv: Path, wrong: int = 0) -> pd.DataFrame:
    """A challenger's answers on the test split: right on all but the first ``wrong``."""
    test = load_split(split_csv).query("split == 'test'").reset_index(drop=True)
    return pd.DataFrame(
        {"path": test["path"], "true_label": test["label"], "correct": test.index >= wrong}
    )


def publish_champion(
    store: ObjectStore, bucket: str, tmp_path: Path, recorded: float, trained_on: list[str]
) -> str:
    """A production model that calls every image glioma: 25 % on a balanced test split."""
    bundle = constant_bundle(predicted=0)
    bundle = replace(bundle, metadata={"data": {"trained_on": trained_on}})
    bundle.save(tmp_path / "champion")
    uri = S3Uri(bucket, "brain/v1")
    store.upload_dir(tmp_path / "champion", uri, progress=False)
    record = {"version": "v1", "storage_uri": str(uri), "accuracy": recorded}
    store.put_json(record, production_record_uri(bucket, "brain"))
    return str(uri)


def test_first_model_ever_faces_the_threshold_only(
    prepared: tuple[Path, Path], store: ObjectStore, bucket: str
) -> None:
    assert fetch_champion(bucket, "brain", store) is None
    predictions = challenger_predictions(prepared[1])
    decision = gate_model(0.6, 0.5, bucket, "brain", predictions, *prepared, store=store)
    assert decision.promote and decision.champion_accuracy is None
    assert "first model" in decision.comparison


def test_the_champion_is_scored_only_on_images_it_never_trained_on(
    prepared: tuple[Path, Path],
    store: ObjectStore,
    bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    dataset, split_csv = prepared
    test = load_split(split_csv).query("split == 'test'")
    others = test[test["label"] != "glioma"]
    seen = [h[:HASH_PREFIX] for h in others["content_hash"].head(4)]  # it trained on 4 of them
    uri = publish_champion(store, bucket, tmp_path, recorded=0.99, trained_on=seen)
    assert fetch_champion(bucket, "brain", store).storage_uri == uri  # its old claim is ignored
    predictions = challenger_predictions(split_csv, wrong=len(test) - 1)  # right on one image
    worse = gate_model(0.2, 0.1, bucket, "brain", predictions, dataset, split_csv, store=store)
    compared = worse.compared
    assert compared["excluded"] == 4 and compared["images"] == len(test) - 4
    gliomas = (test["label"] == "glioma").sum()  # all it gets right: it calls everything glioma
    assert compared["champion_accuracy"] == pytest.approx(gliomas / (len(test) - 4))
    assert not worse.promote and "v1" in worse.reason
    assert '"gate": "KEEP PRODUCTION"' in capsys.readouterr().out  # decision and scores logged
    better = gate_model(
        1.0,
        0.1,
        bucket,
        "brain",
        challenger_predictions(split_csv),
        dataset,
        split_csv,
        store=store,
    )
    assert better.promote and better.compared["only_second_right"] == 0


def test_unreadable_champion_falls_back_to_its_recorded_accuracy(
    prepared: tuple[Path, Path], store: ObjectStore, bucket: str
) -> None:
    record = {"version": "v0", "storage_uri": f"s3://{bucket}/brain/gone", "accuracy": 0.8}
    store.put_json(record, production_record_uri(bucket, "brain"))
    predictions = challenger_predictions(prepared[1])
    decision = gate_model(0.7, 0.5, bucket, "brain", predictions, *prepared, store=store)
    assert not decision.promote and decision.champion_accuracy == 0.8
    assert "recorded accuracy" in decision.comparison


def test_a_bundle_records_what_it_trained_on(prepared: tuple[Path, Path], tmp_path: Path) -> None:
    from components.config import TrainConfig
    from components.train import TrainRun, train_model

    dataset, split_csv = prepared
    config = TrainConfig(backbone="tiny_cnn", image_size=32, epochs=1, batch_size=16)
    train_model(TrainRun(dataset, split_csv, tmp_path / "m", config, None), progress=False)
    recorded = set(ModelBundle.read_metadata(tmp_path / "m")["data"]["trained_on"])
    frame = load_split(split_csv)
    seen = frame[frame["split"].isin(("train", "val"))]["content_hash"].str[:HASH_PREFIX]
    assert recorded == set(seen) and len(recorded) == 36


def test_the_gate_fails_closed_when_the_record_is_missing_but_a_service_serves(
    prepared: tuple[Path, Path], store: ObjectStore, bucket: str, kube_api
) -> None:
    from brainmri.inference_service import InferenceServiceSpec, render_inference_service
    from brainmri.registry import RecordError
    from brainmri.rollout import apply_inference_service

    served = InferenceServiceSpec("brain", "brain-mri", "s3://models/brain/v7", "img", "brain")
    apply_inference_service(render_inference_service(served), kube_api.api_client())
    predictions = challenger_predictions(prepared[1])
    with pytest.raises(RecordError, match=r"production.json is missing, but .* serves s3://"):
        gate_model(
            0.99,
            0.5,
            bucket,
            "brain",
            predictions,
            *prepared,
            store=store,
            api_client=kube_api.api_client(),
            namespace="brain-mri",
        )


@pytest.mark.parametrize("broken", [b"", b"{half", b'"a string"', b'{"storage_uri": "s3://x"}'])
def test_the_gate_fails_closed_on_an_unreadable_record(
    prepared: tuple[Path, Path], store: ObjectStore, bucket: str, broken: bytes
) -> None:
    from brainmri.registry import RecordError

    store.put_bytes(broken, production_record_uri(bucket, "brain"))
    with pytest.raises(RecordError, match="is not a production record"):
        gate_model(
            0.99, 0.5, bucket, "brain", challenger_predictions(prepared[1]), *prepared, store=store
        )

"""The champion/challenger gate: the pure decision, and the champion fetched from the models
bucket and scored on the challenger's own test split (real local S3 server)."""

from pathlib import Path

import pytest

from brainmri.registry import production_record_uri
from brainmri.storage import ObjectStore, S3Uri
from components.gate import fetch_champion, gate_decision, gate_model
from tests.test_evaluate import constant_bundle


@pytest.mark.parametrize(
    "accuracy, threshold, champion, tolerance, promote",
    [
        (0.95, 0.9, None, 0.0, True),  # first model ever: the threshold alone decides
        (0.85, 0.9, None, 0.0, False),
        (0.95, 0.9, 0.94, 0.0, True),  # better than production
        (0.95, 0.9, 0.96, 0.02, True),  # slightly worse, within tolerance
        (0.95, 0.9, 0.98, 0.02, False),  # worse by more than the tolerance
        (0.85, 0.9, 0.50, 0.0, False),  # the threshold holds even against a weak champion
        (0.9, 0.9, 0.9, 0.0, True),  # ties pass
    ],
)
def test_gate_decision(
    accuracy: float, threshold: float, champion: float | None, tolerance: float, promote: bool
) -> None:
    decision = gate_decision(accuracy, threshold, champion, tolerance, "v1")
    assert decision.promote is promote
    assert decision.challenger_accuracy == accuracy and decision.champion_accuracy == champion
    assert ("v1" in decision.reason) is (champion is not None and accuracy >= threshold)


def test_gate_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="not a fraction"):
        gate_decision(1.5, 0.9)
    with pytest.raises(ValueError, match="champion_accuracy"):
        gate_decision(0.9, 0.9, champion_accuracy=-0.1)
    with pytest.raises(ValueError, match="tolerance"):
        gate_decision(0.9, 0.9, 0.9, tolerance=-0.01)


def publish_champion(store: ObjectStore, bucket: str, tmp_path: Path, recorded: float) -> str:
    """A production model that calls every image glioma: 25 % on a balanced test split."""
    constant_bundle(predicted=0).save(tmp_path / "champion")
    uri = S3Uri(bucket, "brain/v1")
    store.upload_dir(tmp_path / "champion", uri, progress=False)
    record = {"version": "v1", "storage_uri": str(uri), "accuracy": recorded}
    store.put_json(record, production_record_uri(bucket, "brain"))
    return str(uri)


def test_first_model_ever_faces_the_threshold_only(
    prepared: tuple[Path, Path], store: ObjectStore, bucket: str
) -> None:
    assert fetch_champion(bucket, "brain", store) is None
    decision = gate_model(0.6, 0.5, 0.0, bucket, "brain", *prepared, store=store)
    assert decision.promote and decision.champion_accuracy is None
    assert "first model" in decision.comparison


def test_champion_is_scored_on_the_challengers_test_split(
    prepared: tuple[Path, Path],
    store: ObjectStore,
    bucket: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    uri = publish_champion(store, bucket, tmp_path, recorded=0.99)  # its old claim is ignored
    champion = fetch_champion(bucket, "brain", store)
    assert champion is not None and champion.storage_uri == uri
    worse = gate_model(0.2, 0.1, 0.01, bucket, "brain", *prepared, store=store)
    assert not worse.promote and worse.champion_accuracy == 0.25
    assert "same 'test' split" in worse.comparison and "v1" in worse.reason
    assert '"gate": "KEEP PRODUCTION"' in capsys.readouterr().out  # decision and scores logged
    within = gate_model(0.2, 0.1, 0.05, bucket, "brain", *prepared, store=store)
    assert within.promote and within.champion_accuracy == 0.25


def test_unreadable_champion_falls_back_to_its_recorded_accuracy(
    prepared: tuple[Path, Path], store: ObjectStore, bucket: str
) -> None:
    record = {"version": "v0", "storage_uri": f"s3://{bucket}/brain/gone", "accuracy": 0.8}
    store.put_json(record, production_record_uri(bucket, "brain"))
    decision = gate_model(0.7, 0.5, 0.0, bucket, "brain", *prepared, store=store)
    assert not decision.promote and decision.champion_accuracy == 0.8
    assert "recorded accuracy" in decision.comparison

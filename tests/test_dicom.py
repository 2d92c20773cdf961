"""DICOM in: rendering (16- and 12-bit, windows, MONOCHROME1, compressed), what is quarantined,
patient-level grouping across the split, and no patient data in any artifact of a run."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydicom.uid import JPEG2000Lossless, RLELossless

from brainmri.demo_data import synthetic_slice
from brainmri.demo_dicom import DemoPatient, dicom_instance, generate_demo_dicom
from brainmri.dicom import (
    FRAME_POLICY_ENV,
    SALT_ENV,
    DicomError,
    identifier_key,
    is_dicom,
    read_dicom,
    salt_from_env,
)
from brainmri.images import ImageDecodeError, decode_image
from brainmri.settings import SettingsError
from tests.phi import run_and_search

SALT = "test-salt-0123456789abcdef"
PATIENT = DemoPatient.numbered("glioma", 7)
PIXELS = synthetic_slice("glioma", np.random.default_rng(0), 64)


def grey(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("L"), dtype=np.int64)


@pytest.fixture(autouse=True)
def salted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SALT_ENV, SALT)
    monkeypatch.delenv(FRAME_POLICY_ENV, raising=False)


@pytest.mark.parametrize(
    "options",
    [
        {"bits_stored": 16},
        {"bits_stored": 12},
        {"bits_stored": 12, "window": False},  # no window in the file: its full range
        {"bits_stored": 16, "monochrome1": True},
        {"bits_stored": 16, "transfer_syntax": JPEG2000Lossless},
        {"bits_stored": 12, "transfer_syntax": RLELossless},
    ],
    ids=["16-bit", "12-bit", "12-bit-no-window", "monochrome1", "jpeg2000", "rle"],
)
def test_a_dicom_slice_renders_as_the_image_it_was_made_from(options: dict) -> None:
    data = dicom_instance(PIXELS, PATIENT, **options)
    assert is_dicom(data)
    rendered = read_dicom(data, SALT)
    assert (grey(rendered.image) == PIXELS).all()  # lossless, windowed onto 0..255
    assert rendered.image.mode == "RGB" and rendered.bits_stored == options["bits_stored"]
    if "transfer_syntax" in options:
        assert "Lossless" in rendered.transfer_syntax and "Little Endian" not in (
            rendered.transfer_syntax
        )
    assert rendered.window == ("file window" if options.get("window", True) else "full range")
    assert (grey(decode_image(data)) == PIXELS).all()  # the one path: ingest and the predictor


def test_the_file_window_is_applied_as_the_standard_defines_it() -> None:
    """A narrow window (centre 2048, width 1024 of 12 bits): below it black, above it white,
    linear between (PS3.3 C.11.2.1.2.1)."""
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(dicom_instance(PIXELS, PATIENT, bits_stored=12)))
    ds.WindowCenter, ds.WindowWidth = 2048, 1024
    out = io.BytesIO()
    ds.save_as(out)
    rendered = grey(read_dicom(out.getvalue()).image)
    stored = np.rint(PIXELS / 255.0 * 4095)
    expected = np.clip(((stored - 2047.5) / 1023 + 0.5) * 255, 0, 255)
    assert np.abs(rendered - expected).max() <= 1
    assert (rendered[stored <= 1535] == 0).all() and (rendered[stored > 2560] == 255).all()


def unsupported_syntax() -> bytes:
    """An instance whose pixel data is in a transfer syntax no installed decoder reads (MPEG-2)."""
    from pydicom import dcmread
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = dcmread(io.BytesIO(dicom_instance(PIXELS, PATIENT)))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3 not really a video"])
    ds["PixelData"].VR = "OB"
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_what_cannot_be_rendered_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DicomError, match="without pixel data"):
        read_dicom(dicom_instance(PIXELS, PATIENT, pixel_data=False))
    frames = dicom_instance(PIXELS, PATIENT, frames=3)
    with pytest.raises(DicomError, match=f"3 frames: set {FRAME_POLICY_ENV}=middle"):
        read_dicom(frames)
    with pytest.raises(ImageDecodeError, match="payload: DICOM with 3 frames"):
        decode_image(frames)
    with pytest.raises(DicomError, match="transfer syntax MPEG2 .* cannot be decoded"):
        read_dicom(unsupported_syntax())
    monkeypatch.setenv(FRAME_POLICY_ENV, "middle")
    assert (grey(read_dicom(frames).image) == PIXELS).all()
    monkeypatch.setenv(FRAME_POLICY_ENV, "all")
    with pytest.raises(DicomError, match="expected one of"):
        read_dicom(frames)
    truncated = dicom_instance(PIXELS, PATIENT)[:400]
    with pytest.raises(DicomError):
        read_dicom(truncated)


def test_the_server_checks_a_dicom_header_against_its_pixel_limit_before_decoding() -> None:
    from serving.protocol import decode_encoded

    frames = dicom_instance(PIXELS, PATIENT, frames=4)  # 64 x 256 pixels announced
    with pytest.raises(ValueError, match="64x256 pixels is too large"):
        decode_encoded(frames, max_pixels=64 * 255)
    assert decode_encoded(dicom_instance(PIXELS, PATIENT), max_pixels=64 * 64).size == (64, 64)


def test_identifiers_are_kept_only_as_salted_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    rendered = read_dicom(dicom_instance(PIXELS, PATIENT), SALT)
    assert rendered.patient_key == identifier_key(PATIENT.patient_id, SALT)
    assert rendered.patient_key != identifier_key(PATIENT.patient_id, SALT + "x")
    assert PATIENT.patient_id not in repr(rendered)
    assert read_dicom(dicom_instance(PIXELS, PATIENT)).patient_key is None  # no salt: no key
    monkeypatch.delenv(SALT_ENV)
    with pytest.raises(SettingsError, match=f"{SALT_ENV} is not set"):
        salt_from_env()


@pytest.fixture(scope="module")
def dicom_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """16 slices per class from 4-slice patients (16-bit, some 12-bit and JPEG 2000), plus an
    instance without pixel data and a multi-frame one."""
    root = tmp_path_factory.mktemp("dicom")
    patients = generate_demo_dicom(root, per_class=16, size=64, seed=3, slices_per_patient=4)
    extra = DemoPatient.numbered("notumor", 999)
    (root / "glioma" / "twelve.dcm").write_bytes(
        dicom_instance(
            synthetic_slice("glioma", np.random.default_rng(9), 64), extra, bits_stored=12
        )
    )
    (root / "glioma" / "j2k.dcm").write_bytes(
        dicom_instance(
            synthetic_slice("glioma", np.random.default_rng(10), 64),
            extra,
            transfer_syntax=JPEG2000Lossless,
            instance=2,
        )
    )
    (root / "notumor" / "report.dcm").write_bytes(dicom_instance(PIXELS, extra, pixel_data=False))
    (root / "notumor" / "cine.dcm").write_bytes(dicom_instance(PIXELS, extra, frames=4))
    return root, [*patients.values(), extra]


def test_ingest_renders_dicom_quarantines_what_it_cannot_and_groups_by_patient(
    dicom_tree: tuple, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from brainmri.dataset import MANIFEST_FILE, read_manifest
    from components.ingest import ingest_dataset
    from components.split import split_manifest

    root, patients = dicom_tree
    out = tmp_path_factory.mktemp("ingested")
    report = ingest_dataset(str(root), out, progress=False, max_quarantine_fraction=0.1)
    reasons = {q["source"].rsplit("/", 1)[-1]: q["reason"] for q in report.quarantined}
    assert "without pixel data" in reasons["report.dcm"] and "4 frames" in reasons["cine.dcm"]
    assert all("not copied" in r for r in reasons.values())
    assert not (out / "quarantine").exists()  # a DICOM file carries patient data: not copied
    manifest = read_manifest(out / MANIFEST_FILE)
    assert len(manifest) == 4 * 16 + 2 and set(manifest["mode"]) == {"DICOM"}
    assert set(manifest["bits_stored"]) == {12, 16} and set(manifest["photometric"]) == {
        "MONOCHROME2"
    }
    for rel in manifest["path"]:  # the dataset holds the rendered PNG, not the DICOM file
        stored = (out / rel).read_bytes()
        assert rel.endswith(".dcm.png") and stored.startswith(b"\x89PNG") and not is_dicom(stored)
    keys = {identifier_key(p.patient_id, SALT) for p in patients}
    assert set(manifest["patient"]) <= keys and manifest["patient"].nunique() == 4 * 4 + 1
    # one patient's slices are one group: the split never puts a patient on both sides
    frame = split_manifest(manifest, 0.25, 0.25, seed=0)
    assert frame.groupby("patient")["split"].nunique().max() == 1
    assert set(frame["split"]) == {"train", "val", "test"}
    # (and the patients would straddle it if the split went by content groups alone)
    content_only = split_manifest(manifest.assign(group=manifest["content_hash"]), 0.25, 0.25)
    assert content_only.groupby("patient")["split"].nunique().max() > 1


def test_ingest_without_a_salt_stops_saying_how_to_set_it(
    dicom_tree: tuple, tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from components.ingest import ingest_dataset

    monkeypatch.delenv(SALT_ENV)
    with pytest.raises(SettingsError, match=f"export {SALT_ENV}="):
        ingest_dataset(str(dicom_tree[0]), tmp_path_factory.mktemp("unsalted"), progress=False)


def phi_values(patients: list[DemoPatient]) -> set[str]:
    return {value for p in patients for value in p.values()}


def test_no_patient_data_leaves_a_pipeline_run(
    s3_env: dict, dicom_tree: tuple, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """Every artifact of a kfp.local run over tagged DICOM files (dataset, reports, metrics,
    model bundle, records in the models bucket) and its output are searched for every
    patient's name, ID, birth date and accession number."""
    root, patients = dicom_tree
    raw = b"".join(p.read_bytes() for p in root.rglob("*.dcm"))
    assert all(value.encode() in raw for value in phi_values(patients))  # what is looked for
    found = run_and_search(
        str(root), tmp_path / "root", "dicom-models", phi_values(patients), capfd
    )
    assert not found, f"patient data in artifacts: {found[:5]}"
    manifest = pd.read_csv(next(p for p in (tmp_path / "root").rglob("manifest.csv")))
    assert manifest["patient"].notna().all()  # the salted keys are there instead

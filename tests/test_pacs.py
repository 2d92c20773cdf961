"""A PACS as the source: ingest from a running Orthanc over DICOMweb (QIDO-RS, WADO-RS), with the
quarantine, patient keys and errors of any source, and no identifier in what it writes."""

from __future__ import annotations

import io
import secrets
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom import dcmread

from brainmri import CLASS_NAMES
from brainmri.demo_data import synthetic_slice
from brainmri.demo_dicom import DemoPatient, dicom_instance
from brainmri.dicom import SALT_ENV
from brainmri.dicomweb import DicomwebSource, PacsError, read_labels
from brainmri.local_servers import free_ports
from tests import orthanc

SLICES, PATIENTS_PER_CLASS = 4, 3


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """Orthanc loaded with 2 patients x 4 slices per class (one study each) and an instance
    without pixel data; the labels file maps each StudyInstanceUID to its class."""
    why = orthanc.missing()
    if why:
        pytest.skip(why)
    user, password = f"u{secrets.token_hex(4)}", secrets.token_hex(12)
    server = orthanc.LocalOrthanc(tmp_path_factory.mktemp("orthanc"), user, password).start()
    rng = np.random.default_rng(5)
    rows, values = [], set()
    for label in CLASS_NAMES:
        for number in range(PATIENTS_PER_CLASS):
            patient = DemoPatient.numbered(label, 500 + number)
            values |= set(patient.values())
            for instance in range(1, SLICES + 1):
                data = dicom_instance(
                    synthetic_slice(label, rng, 64), patient, bits_stored=12, instance=instance
                )
                server.upload(data)
            header = dcmread(io.BytesIO(data))
            rows.append(
                {
                    "StudyInstanceUID": header.StudyInstanceUID,
                    "SeriesInstanceUID": header.SeriesInstanceUID,
                    "label": label,
                }
            )
            values |= {header.StudyInstanceUID, header.SeriesInstanceUID}
    report = dicom_instance(
        synthetic_slice("glioma", rng, 64), patient, instance=99, pixel_data=False
    )
    server.upload(report)  # in the last patient's study: found, fetched, quarantined
    labels = tmp_path_factory.mktemp("labels") / "labels.csv"
    pd.DataFrame(rows).drop(columns="SeriesInstanceUID").to_csv(labels, index=False)
    pd.DataFrame(rows).drop(columns="StudyInstanceUID").to_csv(
        labels.with_name("series.csv"), index=False
    )
    try:
        yield server, labels, values
    finally:
        server.stop()


@pytest.fixture()
def credentials(pacs: tuple, monkeypatch: pytest.MonkeyPatch) -> str:
    server, labels, _ = pacs
    monkeypatch.setenv("DICOMWEB_USERNAME", server.user)
    monkeypatch.setenv("DICOMWEB_PASSWORD", server.password)
    monkeypatch.setenv(SALT_ENV, "pacs-salt-0123456789abcdef")
    return f"dicomweb+{server.dicomweb_url}?labels={labels}"


def test_ingest_reads_the_pacs_like_any_source(
    credentials: str, pacs: tuple, tmp_path: Path
) -> None:
    from brainmri.dataset import MANIFEST_FILE, read_manifest
    from components.ingest import ingest_dataset

    _, _, values = pacs
    report = ingest_dataset(credentials, tmp_path / "dataset", progress=False)
    assert report.class_counts == {c: SLICES * PATIENTS_PER_CLASS for c in CLASS_NAMES}
    [quarantined] = report.quarantined
    assert "without pixel data" in quarantined["reason"] and "not copied" in quarantined["reason"]
    manifest = read_manifest(tmp_path / "dataset" / MANIFEST_FILE)
    assert manifest["patient"].nunique() == len(CLASS_NAMES) * PATIENTS_PER_CLASS
    assert set(manifest["bits_stored"]) == {12}
    assert all(s.startswith(f"dicomweb+{pacs[0].dicomweb_url}/") for s in manifest["source"])
    written = [p.read_bytes() for p in (tmp_path / "dataset").rglob("*") if p.is_file()]
    leaked = [v for v in values if any(v.encode() in data for data in written)]
    assert not leaked, f"identifiers in the dataset: {leaked}"  # names, IDs, dates, UIDs


def test_the_pacs_refuses_wrong_credentials_and_says_what_to_set(
    credentials: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from components.ingest import ingest_dataset

    monkeypatch.setenv("DICOMWEB_PASSWORD", "wrong")
    with pytest.raises(PacsError, match="HTTP 401.*DICOMWEB_USERNAME/DICOMWEB_PASSWORD"):
        ingest_dataset(credentials, tmp_path / "d", progress=False)


def test_an_unknown_uid_in_the_labels_file_is_named_by_its_line(
    credentials: str, pacs: tuple, tmp_path: Path
) -> None:
    from brainmri.class_folders import list_labelled_files

    server, labels, _ = pacs
    frame = pd.read_csv(labels)
    frame.loc[len(frame)] = {"StudyInstanceUID": "1.2.3.4.5", "label": "glioma"}
    bad = tmp_path / "labels.csv"
    frame.to_csv(bad, index=False)
    with pytest.raises(PacsError, match=f"line {len(frame) + 1}: no instance of that"):
        list_labelled_files(f"dicomweb+{server.dicomweb_url}?labels={bad}")


def test_an_unreachable_pacs_or_a_bad_source_says_so(
    credentials: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from brainmri.class_folders import list_labelled_files

    labels = DicomwebSource.parse(credentials).labels
    dead = f"dicomweb+http://127.0.0.1:{free_ports(1)[0]}/dicom-web?labels={labels}"
    with pytest.raises(PacsError, match="is not answering DICOMweb"):
        list_labelled_files(dead)
    with pytest.raises(PacsError, match=r"\?labels=<labels.csv>"):
        DicomwebSource.parse("dicomweb+http://pacs:8042/dicom-web")
    (tmp_path / "l.csv").write_text("uid,label\n1.2,glioma\n")
    with pytest.raises(PacsError, match="one of StudyInstanceUID, SeriesInstanceUID"):
        read_labels(str(tmp_path / "l.csv"))


def test_make_run_takes_a_pacs_source_like_any_other(credentials: str) -> None:
    """``make run DATA=dicomweb+...``: the query image comes from the PACS too."""
    from pipelines.quickstart import query_image

    label, data = query_image(credentials, None)
    assert label in CLASS_NAMES and data[128:132] == b"DICM"


def test_a_labels_file_may_name_series_instead_of_studies(credentials: str, pacs: tuple) -> None:
    from brainmri.class_folders import list_labelled_files

    server, labels, _ = pacs
    series = labels.with_name("series.csv")
    files = list_labelled_files(f"dicomweb+{server.dicomweb_url}?labels={series}")
    # every slice, and the report instance (it is in the last patient's series too)
    assert len(files) == len(CLASS_NAMES) * PATIENTS_PER_CLASS * SLICES + 1
    assert {f.label for f in files} == set(CLASS_NAMES)


def test_the_pipeline_trains_from_the_pacs_and_no_identifier_leaves_it(
    s3_env: dict, credentials: str, pacs: tuple, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """``make run DATA=dicomweb+...`` runs this DAG: ingest from the PACS, then every step; no
    name, ID, birth date, accession number or UID in any artifact, record or output."""
    from tests.phi import run_and_search

    found = run_and_search(credentials, tmp_path / "root", "pacs-models", pacs[2], capfd)
    assert not found, f"identifiers in artifacts: {found[:5]}"

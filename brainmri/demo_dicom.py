"""The synthetic demo slices as DICOM MR instances, tagged like a PACS holds them.

Each class's slices belong to made-up patients (``slices_per_patient`` each, one study and one
series per patient) whose name, ID, birth date and accession number are written into every
instance: the values a test then looks for in every artifact, where none may appear. Pixel
values are the demo image scaled to ``bits_stored`` bits, with a window that shows all of them.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brainmri import CLASS_NAMES
from brainmri.demo_data import synthetic_slice

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@dataclass(frozen=True)
class DemoPatient:
    """Made-up identifying tags (what must never leave ingest)."""

    name: str
    patient_id: str
    birth_date: str
    accession: str

    @classmethod
    def numbered(cls, label: str, number: int) -> DemoPatient:
        return cls(
            f"Demo^{label.title()}{number:03d}",
            f"PID-{label[:3].upper()}-{number:05d}",
            f"19{40 + number % 50:02d}0{1 + number % 9}1{number % 10}",
            f"ACC{CLASS_NAMES.index(label)}{number:06d}",
        )

    def values(self) -> tuple[str, ...]:
        return (self.name, self.patient_id, self.birth_date, self.accession)


def _uid(*parts: object) -> str:
    """A deterministic DICOM UID under pydicom's root."""
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[str(p) for p in parts])


def dicom_instance(
    pixels: np.ndarray,
    patient: DemoPatient,
    *,
    bits_stored: int = 16,
    study: str = "study",
    series: str = "series",
    instance: int = 1,
    window: bool = True,
    monochrome1: bool = False,
    transfer_syntax: str | None = None,
    pixel_data: bool = True,
    frames: int = 1,
) -> bytes:
    """One DICOM Part 10 MR instance of the 8-bit greyscale ``pixels`` (H, W) at
    ``bits_stored`` bits; ``transfer_syntax`` (a UID) compresses it (e.g. JPEG 2000
    Lossless, RLE Lossless)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    top = 2**bits_stored - 1
    stored = np.rint(pixels.astype(np.float64) / 255.0 * top)
    if monochrome1:
        stored = top - stored
    stored = stored.astype(np.uint16 if bits_stored > 8 else np.uint8)
    if frames > 1:
        stored = np.stack([stored] * frames)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = _uid(patient.patient_id, study, series, instance)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.Modality = "MR"
    ds.PatientName, ds.PatientID = patient.name, patient.patient_id
    ds.PatientBirthDate, ds.AccessionNumber = patient.birth_date, patient.accession
    ds.StudyInstanceUID = _uid(patient.patient_id, study)
    ds.SeriesInstanceUID = _uid(patient.patient_id, study, series)
    ds.StudyDate = ds.SeriesDate = "20260115"
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated = 16 if bits_stored > 8 else 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    if window:
        ds.WindowCenter, ds.WindowWidth = (top + 1) / 2, top + 1
    if pixel_data:
        ds.PixelData = stored.tobytes()
    if transfer_syntax is not None and pixel_data:
        ds.compress(transfer_syntax, stored)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def generate_demo_dicom(
    out_dir: Path,
    per_class: int = 12,
    size: int = 64,
    seed: int = 0,
    *,
    bits_stored: int = 16,
    slices_per_patient: int = 3,
    transfer_syntax: str | None = None,
) -> dict[str, DemoPatient]:
    """Write ``out_dir/<class>/<class>-NNNN.dcm`` (``per_class`` demo slices per class);
    returns every patient by the hash of their ID, for tests to look for."""
    rng = np.random.default_rng(seed)
    patients: dict[str, DemoPatient] = {}
    for label in CLASS_NAMES:
        (Path(out_dir) / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            patient = DemoPatient.numbered(label, seed * 1000 + i // slices_per_patient)
            patients[hashlib.sha256(patient.patient_id.encode()).hexdigest()] = patient
            data = dicom_instance(
                synthetic_slice(label, rng, size),
                patient,
                bits_stored=bits_stored,
                instance=i % slices_per_patient + 1,
                transfer_syntax=transfer_syntax,
            )
            (Path(out_dir) / label / f"{label}-{i:04d}.dcm").write_bytes(data)
    return patients

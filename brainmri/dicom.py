"""DICOM instances as the network sees them, and their identifiers only as salted hashes.

One rendering for ingest and the predictor (:func:`brainmri.images.decode_image` calls it for
any payload that is a DICOM Part 10 file, whatever its name):

1. the pixel data, decoded by pydicom (compressed transfer syntaxes such as JPEG, JPEG-LS,
   JPEG 2000 and RLE through pylibjpeg);
2. the Modality LUT (Rescale Slope/Intercept, or a Modality LUT Sequence);
3. the VOI LUT: the file's first window (Window Center/Width) or VOI LUT Sequence; a file
   without one is stretched from its darkest to its brightest value (the documented default,
   as wide PNGs are, :func:`brainmri.images.to_8_bits`);
4. MONOCHROME1 inverted, so that bright means the same as in MONOCHROME2;
5. scaled onto 0..255 and made RGB, as every image is.

What it cannot render raises :class:`DicomError` with the reason (no pixel data, several frames
while the frame policy is ``reject``, colour data, an unsupported transfer syntax), and ingest
quarantines the file with it. Patient and study identifiers leave this module only through
:func:`identifier_key`: a salted SHA-256 (salt ``BRAINMRI_ID_SALT``, a secret of the site).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from brainmri.images import stretch_to_uint8
from brainmri.settings import SettingsError

PREAMBLE_BYTES, MAGIC = 128, b"DICM"
SALT_ENV = "BRAINMRI_ID_SALT"
FRAME_POLICY_ENV = "BRAINMRI_DICOM_FRAMES"
FRAME_POLICIES = ("reject", "middle", "first")  # what to do with a multi-frame instance
KEY_HEX = 16  # hex characters kept of a salted identifier hash
MONOCHROME = ("MONOCHROME1", "MONOCHROME2")


class DicomError(ValueError):
    """A DICOM instance that cannot be rendered; the message says why."""


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``."""
    return data[PREAMBLE_BYTES : PREAMBLE_BYTES + len(MAGIC)] == MAGIC


def salt_from_env(env: Mapping[str, str] | None = None) -> str:
    """The site's identifier salt; a :class:`SettingsError` saying how to set it when missing."""
    env = os.environ if env is None else env
    salt = env.get(SALT_ENV, "").strip()
    if len(salt) < 16:
        raise SettingsError(
            f"{SALT_ENV} is not set (or shorter than 16 characters): DICOM patient and study "
            "identifiers are kept only as salted hashes; set it to a long random secret of your "
            f"site (e.g. `export {SALT_ENV}=$(openssl rand -hex 32)`), the same for every run"
        )
    return salt


def identifier_key(value: str, salt: str) -> str:
    """The salted hash an identifier is kept as (never the identifier)."""
    return hashlib.sha256(f"{salt}\0{value.strip()}".encode()).hexdigest()[:KEY_HEX]


@dataclass(frozen=True)
class DicomSlice:
    """A rendered instance: the image and what the manifest keeps of the file."""

    image: Image.Image  # 8-bit RGB
    bits_stored: int
    photometric: str
    transfer_syntax: str
    window: str  # "file window", "VOI LUT sequence" or "full range"
    patient_key: str | None  # salted PatientID, else StudyInstanceUID; None without a salt
    study_key: str | None


def frame_policy(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    policy = env.get(FRAME_POLICY_ENV, "").strip() or FRAME_POLICIES[0]
    if policy not in FRAME_POLICIES:
        raise DicomError(f"{FRAME_POLICY_ENV}={policy!r}: expected one of {FRAME_POLICIES}")
    return policy


def dicom_size(data: bytes) -> tuple[int, int]:
    """(width, height x frames) as the header announces them, read without the pixel data:
    what a server checks against its pixel limit before decoding."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except Exception as err:  # noqa: BLE001 - any header pydicom cannot parse
        raise DicomError(f"not a readable DICOM file ({err})") from err
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0) * frames


def read_dicom(data: bytes, salt: str | None = None, frames: str | None = None) -> DicomSlice:
    """Render ``data`` (a DICOM Part 10 file); with ``salt``, its patient and study keys."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except (InvalidDicomError, OSError, ValueError, EOFError) as err:
        raise DicomError(f"not a readable DICOM file ({err})") from err
    syntax = ds.file_meta.get("TransferSyntaxUID")
    syntax_name = getattr(syntax, "name", str(syntax))
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        raise DicomError("DICOM without pixel data (e.g. a structured report): nothing to see")
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric not in MONOCHROME:
        raise DicomError(f"DICOM photometric interpretation {photometric!r}: only greyscale")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    policy = frames or frame_policy()
    if count > 1 and policy == "reject":
        raise DicomError(
            f"DICOM with {count} frames: set {FRAME_POLICY_ENV}=middle (or first) to take one"
        )
    try:
        pixels = ds.pixel_array
    except Exception as err:  # pydicom raises many kinds for a syntax it cannot decode
        raise DicomError(
            f"DICOM pixel data in transfer syntax {syntax_name} cannot be decoded ({err})"
        ) from err
    if count > 1:
        index = count // 2 if policy == "middle" else 0
        pixels = pixels[index]
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    window = _window_source(ds)
    output_range = None
    if window != "full range":
        # the range the VOI LUT maps onto: where it sends values far below and above any window
        ends = apply_voi_lut(np.array([-1e15, 1e15]), ds, index=0)
        output_range = float(np.min(ends)), float(np.max(ends))
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
    image = _to_8_bits(values, photometric == "MONOCHROME1", output_range)
    patient = str(ds.get("PatientID", "") or "") or str(ds.get("StudyInstanceUID", "") or "")
    study = str(ds.get("StudyInstanceUID", "") or "")
    return DicomSlice(
        image=image,
        bits_stored=int(ds.get("BitsStored", ds.get("BitsAllocated", 8))),
        photometric=photometric,
        transfer_syntax=syntax_name,
        window=window,
        patient_key=identifier_key(patient, salt) if salt and patient else None,
        study_key=identifier_key(study, salt) if salt and study else None,
    )


def _window_source(ds) -> str:  # noqa: ANN001 - a pydicom Dataset
    if "VOILUTSequence" in ds:
        return "VOI LUT sequence"
    if "WindowCenter" in ds and "WindowWidth" in ds:
        return "file window"
    return "full range"


def _to_8_bits(
    values: np.ndarray, invert: bool, output_range: tuple[float, float] | None
) -> Image.Image:
    """Map ``output_range`` (the VOI LUT's; without one, the values' own lowest to highest)
    linearly onto 0..255, inverted for MONOCHROME1; RGB."""
    scaled = stretch_to_uint8(values, output_range)
    if invert:
        scaled = 255 - scaled
    return Image.fromarray(scaled).convert("RGB")

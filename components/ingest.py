"""Ingest: turn a class-per-folder image tree (local folder or S3 prefix) into a trusted dataset.

Every file is decoded (by content, whatever its extension); unreadable files are quarantined
with the reason. Copies of one image (pixel-identical, or re-encoded, resized or mirrored:
:mod:`components.near_duplicates`) collapse to one inside a class, and the same image under two
labels is excluded as a label conflict. Neighbouring slices stay, but every set of images
joined by near-duplicate pairs is one ``group`` in the manifest, so the split keeps each group
on one side. Nothing is dropped silently: every excluded file is copied or listed in the
dataset folder. Decoding runs in a thread pool with bounded memory.
"""

import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from brainmri import CLASS_NAMES
from brainmri.class_folders import DatasetError, LabelledFile, list_labelled_files
from brainmri.cpu import cpu_budget
from brainmri.dataset import MANIFEST_FILE, NEAR_PAIRS_FILE
from brainmri.dicom import DicomError, is_dicom, read_dicom, salt_from_env
from brainmri.images import ImageDecodeError, decode_image
from brainmri.registry import dataset_record_uri
from brainmri.storage import ObjectStore, S3Uri
from components.config import COPY, NEIGHBOUR, NearDuplicateThresholds, to_dict
from components.near_duplicates import connected_groups, fingerprint, near_pairs

PRIMARY, EXTERNAL = "primary", "external"
MANIFEST_COLUMNS = [
    "path",
    "label",
    "width",
    "height",
    "mode",
    "content_hash",
    "group",
    "source",
    "set",
    # DICOM only: the file's bit depth and photometric interpretation, and the salted hashes of
    # its PatientID (else StudyInstanceUID) and StudyInstanceUID (brainmri.dicom)
    "bits_stored",
    "photometric",
    "patient",
    "study",
]
QUARANTINE_FILE = "quarantine.csv"
DUPLICATES_FILE = "duplicates.csv"
CONFLICTS_FILE = "label_conflicts.csv"
REPORT_FILE = "ingest_report.json"
# the shorter side below which an image cannot be an MRI slice (the public slices are >= 150 px;
# a 1x1 or icon-sized PNG is a mistake, not training data)
MIN_IMAGE_SIDE = 32
UNREADABLE, TOO_SMALL = "unreadable", "too_small"  # quarantine categories besides the layout's
BAD_DATA = (UNREADABLE, TOO_SMALL)  # what max_quarantine_fraction counts
DICOM_LEFT_AT_SOURCE = "its tags identify the patient; it stays at its source"
SAMPLE_PAIRS = 6  # near-duplicate pairs shown per threshold in the data report
GROUP_SIZE_BINS = [(2, 2), (3, 5), (6, 10), (11, 50), (51, None)]


@dataclass
class IngestReport:
    """What ingest found and what it did with each file."""

    class_counts: dict[str, int]
    fingerprint: str
    files_seen: int = 0
    quarantined: list[dict[str, str]] = field(default_factory=list)  # with its category
    duplicates: list[dict[str, str]] = field(default_factory=list)
    label_conflicts: list[dict[str, str]] = field(default_factory=list)
    external_counts: dict[str, int] = field(default_factory=dict)
    near_duplicates: dict[str, Any] = field(default_factory=dict)  # see near_duplicate_summary
    hidden_files: list[str] = field(default_factory=list)  # left out, listed here

    @property
    def total(self) -> int:
        return sum(self.class_counts.values())


def _process(item: LabelledFile, out_dir: Path, dataset_set: str, min_side: int) -> dict:
    """Decode one file and store it under images/ or quarantine/; returns its record (with the
    image's near-duplicate fingerprint when it is readable, its category and reason when not)."""
    data = item.read()
    record = {"label": item.label, "source": item.source, "set": dataset_set}
    relpath, dicom = item.relpath, is_dicom(data)
    try:
        if item.problem is not None:
            raise _Quarantined(item.problem, item.reason)
        if dicom:
            image, mode, data, relpath = _render_dicom(data, relpath, record)
        else:
            image = decode_image(data)
            with Image.open(io.BytesIO(data)) as header:
                mode = header.mode
        if min(image.size) < min_side:
            raise _Quarantined(
                TOO_SMALL,
                f"{image.width}x{image.height} px is too small to be a slice (at least "
                f"{min_side} px a side)",
            )
    except (ImageDecodeError, DicomError) as err:
        dest = Path("quarantine") / dataset_set / relpath
        reason = str(err).removeprefix("payload: ")
        record.update(path=dest.as_posix(), category=UNREADABLE, reason=reason)
    except _Quarantined as why:
        dest = Path("quarantine") / dataset_set / relpath
        record.update(path=dest.as_posix(), category=why.category, reason=why.reason)
    else:
        dest = Path("images") / dataset_set / relpath
        digest = hashlib.sha256(f"{image.size}".encode() + image.tobytes()).hexdigest()
        record.update(
            path=dest.as_posix(),
            width=image.width,
            height=image.height,
            mode=mode,
            content_hash=digest,
            fingerprint=fingerprint(image),
        )
    if dicom and record.get("reason"):  # its tags are patient data: it stays at its source only
        record["reason"] += f" (DICOM: not copied, {DICOM_LEFT_AT_SOURCE})"
        return record
    (out_dir / dest).parent.mkdir(parents=True, exist_ok=True)
    (out_dir / dest).write_bytes(data)
    return record


def _render_dicom(data: bytes, relpath: str, record: dict) -> tuple[Image.Image, str, bytes, str]:
    """A DICOM file as the dataset keeps it: the rendered slice as a PNG (pixels only, no tag
    leaves ingest) at ``<relpath>.png``; the file's bit depth, photometric interpretation and
    salted patient and study keys go into ``record``."""
    rendered = read_dicom(data, salt_from_env())
    record.update(
        bits_stored=rendered.bits_stored,
        photometric=rendered.photometric,
        patient=rendered.patient_key,
        study=rendered.study_key,
    )
    png = io.BytesIO()
    rendered.image.convert("L").save(png, format="PNG")
    return rendered.image, "DICOM", png.getvalue(), f"{relpath}.png"


class _Quarantined(Exception):  # noqa: N818 - a verdict, raised to leave the decode path
    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category, self.reason = category, reason


def _move(out_dir: Path, rel: str, subfolder: str) -> str:
    """Move a stored image out of the dataset into ``quarantine/<subfolder>/``; new path."""
    dest = Path("quarantine") / subfolder / Path(rel).relative_to("images")
    (out_dir / dest).parent.mkdir(parents=True, exist_ok=True)
    shutil.move(out_dir / rel, out_dir / dest)
    return dest.as_posix()


def deduplicate(
    images: pd.DataFrame, out_dir: Path, key: str = "content_hash"
) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    """Collapse the rows of one image (same ``key`` in the same set) within a class to the one
    with the most pixels (the first by path among equals); exclude an image seen under several
    labels. Returns the kept rows, the duplicates (each with the file it duplicates) and the
    label conflicts."""
    keep, duplicates, conflicts = [], [], []
    largest_first = images.assign(_pixels=-images["width"] * images["height"])
    ordered = largest_first.sort_values(["_pixels", "path"]).drop(columns="_pixels")
    for _, group in ordered.groupby(["set", key], sort=False):
        if group["label"].nunique() > 1:
            labels = sorted(group["label"].unique())
            for row in group.itertuples():
                conflicts.append(
                    {
                        "source": row.source,
                        "label": row.label,
                        "labels": "|".join(labels),
                        "content_hash": row.content_hash,
                        "moved_to": _move(out_dir, row.path, "label_conflict"),
                    }
                )
            continue
        keep.append(group.index[0])
        kept = group.iloc[0]
        for row in group.iloc[1:].itertuples():
            duplicates.append(
                {
                    "source": row.source,
                    "label": row.label,
                    "duplicate_of": kept["source"],
                    "kind": "identical" if row.content_hash == kept["content_hash"] else COPY,
                    "moved_to": _move(out_dir, row.path, "duplicate"),
                }
            )
    return images.loc[sorted(keep)], duplicates, conflicts


def _near_duplicate_keys(
    images: pd.DataFrame, thresholds: NearDuplicateThresholds
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``images`` (re-indexed 0..n-1) with two keys, and the near-duplicate pairs (by position).

    ``image``: one value per image, its copies (identical, or within the copy threshold) in the
    same set included. ``group``: the smallest content hash among the images joined to it, in
    its set, by pairs within the neighbour threshold (copies included) or by the same patient
    (DICOM's salted PatientID), transitively.
    """
    images = images.reset_index(drop=True)
    pairs = near_pairs(list(images["fingerprint"]), thresholds)
    sets = images["set"].to_numpy()
    same_set = pairs[sets[pairs["a"]] == sets[pairs["b"]]]
    position = pd.Series(np.arange(len(images)))
    first = position.groupby([images["set"], images["content_hash"]]).transform("min")
    identical = np.stack([position.to_numpy(), first.to_numpy()], axis=1)  # found or not
    copies = same_set.loc[same_set["kind"] == COPY, ["a", "b"]].to_numpy()
    images["image"] = connected_groups(len(images), np.concatenate([copies, identical]))
    neighbours = np.concatenate([same_set[["a", "b"]].to_numpy(), identical, _same_patient(images)])
    joined = connected_groups(len(images), neighbours)
    images["group"] = images.groupby(joined)["content_hash"].transform("min")
    return images, pairs


def _same_patient(images: pd.DataFrame) -> np.ndarray:
    """Pairs (by position) that join each image to the first of its patient in its set: one
    patient's slices form one group, so the split never puts a patient on both sides."""
    if "patient" not in images or images["patient"].isna().all():
        return np.empty((0, 2), dtype=np.int64)
    known = images[images["patient"].notna()]
    position = pd.Series(np.arange(len(images)))[known.index]
    first = position.groupby([known["set"], known["patient"]]).transform("min")
    return np.stack([position.to_numpy(), first.to_numpy()], axis=1)


def _kept_pairs(images: pd.DataFrame, pairs: pd.DataFrame, kept: pd.DataFrame) -> pd.DataFrame:
    """The near-duplicate pairs between kept images, by path. A dropped copy's pairs count for
    the image kept in its place (the nearest distance wins), so no pair is lost with it."""
    kept_path = images["image"].map(kept.set_index("image")["path"]).to_numpy()
    ends = np.stack([kept_path[pairs["a"]], kept_path[pairs["b"]]], axis=1)
    frame = pairs.drop(columns=["a", "b"]).assign(path_a=ends[:, 0], path_b=ends[:, 1])
    frame = frame.dropna(subset=["path_a", "path_b"])  # an end excluded as a label conflict
    frame = frame[frame["path_a"] != frame["path_b"]]
    ordered = np.sort(frame[["path_a", "path_b"]].to_numpy().astype(str), axis=1)
    frame = frame.assign(path_a=ordered[:, 0], path_b=ordered[:, 1])
    frame = frame.sort_values("distance", kind="stable").drop_duplicates(["path_a", "path_b"])
    columns = ["path_a", "path_b", "distance", "mirrored", "kind"]
    return frame.sort_values(["path_a", "path_b"]).reset_index(drop=True)[columns]


def near_duplicate_summary(
    manifest: pd.DataFrame,
    duplicates: list[dict],
    conflicts: list[dict],
    pairs: pd.DataFrame,
    thresholds: NearDuplicateThresholds,
) -> dict[str, Any]:
    """The counts the data report shows: copies collapsed, groups and their sizes, samples."""
    sizes = manifest.loc[manifest["set"] == PRIMARY].groupby("group").size()
    histogram = {
        (f"{low}" if low == high else f"{low}-{high}" if high else f">{low - 1}"): int(
            ((sizes >= low) & (sizes <= (high or sizes.max()))).sum()
        )
        for low, high in GROUP_SIZE_BINS
    }
    samples = {
        kind: pairs[pairs["kind"] == kind]
        .nlargest(SAMPLE_PAIRS, "distance")[["path_a", "path_b", "distance"]]
        .to_dict("records")
        for kind in (COPY, NEIGHBOUR)
    }
    return {
        "thresholds": to_dict(thresholds),
        "copies_collapsed": sum(d["kind"] == COPY for d in duplicates),
        "identical_collapsed": sum(d["kind"] == "identical" for d in duplicates),
        "label_conflicts": len(conflicts),
        "pairs": {kind: int((pairs["kind"] == kind).sum()) for kind in (COPY, NEIGHBOUR)},
        "groups": int((sizes >= 2).sum()),
        "images_in_groups": int(sizes[sizes >= 2].sum()),
        "largest_group": int(sizes.max()) if len(sizes) else 0,
        "group_sizes": histogram,
        "samples": samples,
    }


def content_fingerprint(manifest: pd.DataFrame) -> str:
    """sha256 of the (set, label, pixel hash) triples: renaming or re-uploading is not new data."""
    lines = sorted(
        f"{s},{lbl},{h}"
        for s, lbl, h in zip(
            manifest["set"], manifest["label"], manifest["content_hash"], strict=True
        )
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _ingest_set(
    files: list[LabelledFile],
    out_dir: Path,
    dataset_set: str,
    workers: int,
    progress: bool,
    min_side: int,
) -> Iterator[dict]:
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from tqdm(
            pool.map(lambda f: _process(f, out_dir, dataset_set, min_side), files),
            total=len(files),
            desc=f"ingest {dataset_set}",
            unit="img",
            disable=not progress,
        )


def ingest_dataset(
    source: str,
    out_dir: Path,
    store: ObjectStore | None = None,
    *,
    external_test_source: str = "",
    max_quarantine_fraction: float = 0.05,
    thresholds: NearDuplicateThresholds | None = None,
    strict_class_folders: bool = False,
    min_image_side: int = MIN_IMAGE_SIDE,
    workers: int | None = None,
    progress: bool = True,
) -> IngestReport:
    """Ingest ``source`` (and an optional external test set) into ``out_dir``.

    Writes ``manifest.csv`` (path, label, width, height, mode, content_hash, group, source,
    set), the quarantine, duplicate and label-conflict lists, the near-duplicate pairs between
    the kept images, and ``ingest_report.json``. Quarantined: unreadable files, images under
    ``min_image_side`` px, files outside the class folders and, unless
    ``strict_class_folders`` makes them an error, files in folders that are not a class.
    Hidden files are listed in the report.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    thresholds = thresholds or NearDuplicateThresholds()
    workers = workers or min(8, 2 * cpu_budget())  # decoding waits on I/O too
    sources = {PRIMARY: source, EXTERNAL: external_test_source}
    records: list[dict] = []
    hidden: list[str] = []
    for dataset_set, location in sources.items():
        if location:
            files = list_labelled_files(location, store, strict=strict_class_folders)
            hidden += [f.source for f in files if f.is_hidden]
            files = [f for f in files if not f.is_hidden]
            records += list(
                _ingest_set(files, out_dir, dataset_set, workers, progress, min_image_side)
            )
    frame = pd.DataFrame(records, columns=[*MANIFEST_COLUMNS, "fingerprint", "category", "reason"])
    bad = frame[frame["reason"].notna()]
    columns = ["path", "label", "source", "category", "reason"]
    quarantined = bad[columns].fillna("").to_dict("records")
    images, pairs = _near_duplicate_keys(frame.drop(bad.index), thresholds)
    kept, duplicates, conflicts = deduplicate(images, out_dir, key="image")
    near = _kept_pairs(images, pairs, kept)
    manifest = kept.reindex(columns=MANIFEST_COLUMNS).astype({"width": int, "height": int})

    def counts(dataset_set: str) -> dict[str, int]:
        labels = manifest.loc[manifest["set"] == dataset_set, "label"]
        return {c: int((labels == c).sum()) for c in CLASS_NAMES}

    report = IngestReport(
        counts(PRIMARY),
        content_fingerprint(manifest),
        len(frame),
        quarantined,
        duplicates,
        conflicts,
        counts(EXTERNAL) if external_test_source else {},
        near_duplicate_summary(manifest, duplicates, conflicts, near, thresholds),
        hidden,
    )
    for name, rows in (
        (QUARANTINE_FILE, quarantined),
        (DUPLICATES_FILE, duplicates),
        (CONFLICTS_FILE, conflicts),
    ):
        pd.DataFrame(rows).to_csv(out_dir / name, index=False)
    near.to_csv(out_dir / NEAR_PAIRS_FILE, index=False)
    (out_dir / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
    _check(report, source, out_dir, max_quarantine_fraction)
    manifest.to_csv(out_dir / MANIFEST_FILE, index=False)
    return report


def _check(report: IngestReport, source: str, out_dir: Path, max_fraction: float) -> None:
    """Fail, naming what to fix, when the data cannot train a trustworthy model."""
    bad = [q for q in report.quarantined if q["category"] in BAD_DATA]
    fraction = len(bad) / max(report.files_seen, 1)
    if fraction > max_fraction:
        examples = "; ".join(f"{q['source']}: {q['reason']}" for q in bad[:3])
        raise DatasetError(
            f"{len(bad)} of {report.files_seen} files ({fraction:.1%}) are unreadable or too "
            f"small, above the allowed {max_fraction:.1%} (max_quarantine_fraction); "
            f"see {out_dir / QUARANTINE_FILE}. First: {examples}"
        )
    empty = [c for c, n in report.class_counts.items() if n == 0]
    if empty:
        raise DatasetError(
            f"class(es) {empty} have no usable images in {source} (quarantined: "
            f"{len(report.quarantined)}, see {out_dir / QUARANTINE_FILE}); add images for "
            "every class"
        )


def recorded_fingerprint(dataset_dir: Path) -> str | None:
    """The content fingerprint ingest recorded for the dataset in ``dataset_dir``, if any."""
    try:
        report = json.loads((Path(dataset_dir) / REPORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return report.get("fingerprint") if isinstance(report, dict) else None


def check_new_data(
    fingerprint: str, production: dict | None, skip_if_unchanged: bool
) -> tuple[bool, str]:
    """Whether to go on training, and why; stops only when asked and the data is unchanged."""
    served = (production or {}).get("data_fingerprint")
    if not skip_if_unchanged:
        return True, "new-data check off (skip_if_unchanged=False)"
    if served is None:
        return True, "no production model trained on a recorded dataset yet"
    if served == fingerprint:
        return False, (
            f"dataset {fingerprint[:12]} is the one production was trained on; "
            "nothing new to learn, stopping early"
        )
    return True, f"new data: {fingerprint[:12]} differs from production's {served[:12]}"


def record_dataset(
    store: ObjectStore, models_bucket: str, model_name: str, report: IngestReport, source: str
) -> S3Uri:
    """Record the dataset fingerprint (with its counts) in the models bucket."""
    uri = dataset_record_uri(models_bucket, model_name, report.fingerprint)
    store.ensure_bucket(models_bucket)
    store.put_json(
        {
            "fingerprint": report.fingerprint,
            "source": source,
            "class_counts": report.class_counts,
            "external_counts": report.external_counts,
            "recorded_at": datetime.now(UTC).isoformat(),
        },
        uri,
    )
    return uri

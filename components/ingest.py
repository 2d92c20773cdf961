"""Ingest: copy a class-per-folder image tree (local folder or S3 prefix) into the run's dataset.

Every file is decoded; unreadable ones are quarantined with the reason instead of dropped.
"""

import json
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from brainmri import CLASS_NAMES
from brainmri.dataset import MANIFEST_FILE
from brainmri.images import ImageDecodeError, decode_image
from brainmri.storage import ObjectStore, S3Uri, is_s3_uri

# folder names used by other releases of the data set -> canonical label
CLASS_ALIASES = {
    "glioma_tumor": "glioma",
    "meningioma_tumor": "meningioma",
    "no_tumor": "notumor",
    "pituitary_tumor": "pituitary",
    "no": "notumor",
    "normal": "notumor",
}
QUARANTINE_FILE = "quarantine.csv"
REPORT_FILE = "ingest_report.json"


class DatasetError(ValueError):
    """The source data cannot make a usable data set; the message names the folder or file."""


@dataclass
class IngestReport:
    """What ingest found: usable images per class and the quarantined files with reasons."""

    class_counts: dict[str, int]
    quarantined: list[dict[str, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.class_counts.values())


def canonical_label(folder: str) -> str:
    """Map a class folder name to one of :data:`CLASS_NAMES`, or fail naming the folder."""
    name = folder.strip().lower().replace("-", "_").replace(" ", "_")
    label = name if name in CLASS_NAMES else CLASS_ALIASES.get(name)
    if label is None:
        raise DatasetError(
            f"unknown class folder '{folder}': expected one of {list(CLASS_NAMES)} "
            f"or an alias {sorted(CLASS_ALIASES)}; rename or remove it"
        )
    return label


def _class_folders(root: Path) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise DatasetError(f"source folder {root} does not exist or is not a folder")
    folders: dict[str, list[Path]] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        folders.setdefault(canonical_label(sub.name), []).append(sub)
    if not folders:
        raise DatasetError(f"{root} holds no class folders; expected <class>/<image> subfolders")
    return folders


def ingest_local(root: Path, out_dir: Path, progress: bool = True) -> IngestReport:
    """Decode every file under ``root/<class>/`` into ``out_dir`` and write the manifest."""
    out_dir = Path(out_dir)
    rows, quarantined = [], []
    files = [
        (label, sub, f)
        for label, subs in _class_folders(Path(root)).items()
        for sub in subs
        for f in sorted(sub.rglob("*"))
        if f.is_file()
    ]
    for label, sub, src in tqdm(files, desc="ingest", unit="img", disable=not progress):
        rel = Path(label) / src.relative_to(sub)
        try:
            width, height = decode_image(src).size
        except ImageDecodeError as err:
            dest = out_dir / "quarantine" / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
            quarantined.append({"path": rel.as_posix(), "label": label, "reason": str(err)})
            continue
        dest = out_dir / "images" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        rows.append(
            {"path": f"images/{rel.as_posix()}", "label": label, "width": width, "height": height}
        )
    manifest = pd.DataFrame(rows, columns=["path", "label", "width", "height"])
    counts = {c: int((manifest["label"] == c).sum()) for c in CLASS_NAMES}
    report = IngestReport(counts, quarantined)
    pd.DataFrame(quarantined, columns=["path", "label", "reason"]).to_csv(
        out_dir / QUARANTINE_FILE, index=False
    )
    (out_dir / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        raise DatasetError(
            f"class(es) {empty} have no readable images in {root} (quarantined: "
            f"{len(quarantined)}, see {out_dir / QUARANTINE_FILE}); add images for every class"
        )
    manifest.to_csv(out_dir / MANIFEST_FILE, index=False)
    return report


def ingest_dataset(
    source: str, out_dir: Path, store: ObjectStore | None = None, progress: bool = True
) -> IngestReport:
    """Ingest from a local folder or an ``s3://bucket/prefix`` holding ``<class>/<image>``."""
    if not is_s3_uri(source):
        return ingest_local(Path(source), out_dir, progress)
    store = store or ObjectStore()
    with tempfile.TemporaryDirectory(prefix="ingest-") as staging:
        store.download_dir(S3Uri.parse(source), Path(staging), progress=progress)
        return ingest_local(Path(staging), out_dir, progress)

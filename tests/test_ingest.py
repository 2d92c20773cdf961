"""Ingest from local folders and S3: decoding, aliases, quarantine and clear failures."""

import io
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from brainmri import CLASS_NAMES
from brainmri.dataset import MANIFEST_FILE, read_manifest
from brainmri.storage import ObjectStore, S3Uri
from components.ingest import (
    QUARANTINE_FILE,
    DatasetError,
    canonical_label,
    ingest_dataset,
)


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_ingests_every_class(demo_dir: Path, tmp_path: Path) -> None:
    report = ingest_dataset(str(demo_dir), tmp_path / "out", progress=False)
    assert report.class_counts == dict.fromkeys(CLASS_NAMES, 12)
    manifest = read_manifest(tmp_path / "out" / MANIFEST_FILE)
    assert len(manifest) == 48 and set(manifest["label"]) == set(CLASS_NAMES)
    assert all((tmp_path / "out" / p).is_file() for p in manifest["path"])
    assert (manifest["width"] == 64).all()


def test_bad_files_are_quarantined_not_dropped(demo_dir: Path, tmp_path: Path) -> None:
    src = copy_tree(demo_dir, tmp_path / "src")
    (src / "glioma" / "empty.jpg").write_bytes(b"")
    (src / "glioma" / "notes.jpg").write_text("not an image")
    png = io.BytesIO()
    Image.new("RGBA", (40, 40), (255, 0, 0, 128)).save(png, format="PNG")
    (src / "meningioma" / "really_png.jpg").write_bytes(png.getvalue())  # PNG named .jpg
    (src / "pituitary" / "truncated.png").write_bytes(png.getvalue()[:60])
    report = ingest_dataset(str(src), tmp_path / "out", progress=False)
    reasons = {q["path"]: q["reason"] for q in report.quarantined}
    assert set(reasons) == {"glioma/empty.jpg", "glioma/notes.jpg", "pituitary/truncated.png"}
    assert "empty file" in reasons["glioma/empty.jpg"]
    assert report.class_counts["meningioma"] == 13  # the PNG named .jpg was decoded
    listed = pd.read_csv(tmp_path / "out" / QUARANTINE_FILE)
    assert len(listed) == 3
    assert (tmp_path / "out" / "quarantine" / "glioma" / "notes.jpg").is_file()


def test_class_aliases_and_unknown_folders() -> None:
    assert canonical_label("glioma_tumor") == "glioma"
    assert canonical_label("No Tumor") == "notumor"
    with pytest.raises(DatasetError, match="unknown class folder 'astrocytoma'"):
        canonical_label("astrocytoma")


def test_empty_class_is_a_clear_error(demo_dir: Path, tmp_path: Path) -> None:
    src = copy_tree(demo_dir, tmp_path / "src")
    for f in (src / "pituitary").iterdir():
        f.write_bytes(b"broken")
    with pytest.raises(DatasetError, match=r"\['pituitary'\] have no readable images"):
        ingest_dataset(str(src), tmp_path / "out", progress=False)


def test_missing_source_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        ingest_dataset(str(tmp_path / "nowhere"), tmp_path / "out", progress=False)


def test_ingests_from_s3(store: ObjectStore, bucket: str, demo_dir: Path, tmp_path: Path) -> None:
    store.upload_dir(demo_dir, S3Uri(bucket, "incoming"), progress=False)
    report = ingest_dataset(f"s3://{bucket}/incoming", tmp_path / "out", store, progress=False)
    assert report.total == 48


def test_missing_bucket_source(store: ObjectStore, tmp_path: Path) -> None:
    from brainmri.storage import StorageError

    with pytest.raises(StorageError, match="bucket 'absent-bucket' does not exist"):
        ingest_dataset("s3://absent-bucket/data", tmp_path / "out", store, progress=False)


def test_real_sample_loads(real_sample_dir: Path, tmp_path: Path) -> None:
    """A few real slices per class, including mixed modes, decode and get recorded."""
    src = tmp_path / "src"
    for label in CLASS_NAMES:
        (src / label).mkdir(parents=True)
        for f in sorted((real_sample_dir / label).iterdir())[:5]:
            shutil.copy(f, src / label / f.name)
    report = ingest_dataset(str(src), tmp_path / "out", progress=False)
    assert report.class_counts == dict.fromkeys(CLASS_NAMES, 5) and not report.quarantined

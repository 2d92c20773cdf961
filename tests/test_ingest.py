"""Ingest from local folders and S3: decoding, aliases, dedup, quarantine, new-data detection."""

import io
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from brainmri import CLASS_NAMES
from brainmri.class_folders import DatasetError, canonical_label
from brainmri.dataset import MANIFEST_FILE, read_manifest
from brainmri.registry import dataset_record_uri
from brainmri.storage import ObjectStore, S3Uri, StorageError
from components.data_report import render_data_report
from components.ingest import (
    CONFLICTS_FILE,
    DUPLICATES_FILE,
    QUARANTINE_FILE,
    check_new_data,
    ingest_dataset,
    record_dataset,
)

PNG_NAMED_JPG = ["notumor/Tr-no_1005.jpg", "notumor/Tr-no_1011.jpg", "notumor/Tr-no_1012.jpg"]
DUPLICATE_GROUP = [
    "meningioma/Tr-me_0176.jpg",
    "meningioma/Tr-me_0211.jpg",
    "meningioma/Tr-me_0366.jpg",
]


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def ingest(src: Path | str, out: Path, **kwargs: object):  # noqa: ANN201 - report
    return ingest_dataset(str(src), out, progress=False, **kwargs)


def test_ingests_every_class(demo_dir: Path, tmp_path: Path) -> None:
    report = ingest(demo_dir, tmp_path / "out")
    assert report.class_counts == dict.fromkeys(CLASS_NAMES, 12)
    manifest = read_manifest(tmp_path / "out" / MANIFEST_FILE)
    assert list(manifest.columns) == [
        "path",
        "label",
        "width",
        "height",
        "mode",
        "content_hash",
        "group",
        "source",
        "set",
        "bits_stored",
        "photometric",
        "patient",
        "study",
    ]
    assert len(manifest) == 48 and set(manifest["label"]) == set(CLASS_NAMES)
    assert all((tmp_path / "out" / p).is_file() for p in manifest["path"])
    assert (manifest["width"] == 64).all() and (manifest["mode"] == "L").all()
    assert manifest["content_hash"].is_unique


def test_bad_files_are_quarantined_not_dropped(demo_dir: Path, tmp_path: Path) -> None:
    src = copy_tree(demo_dir, tmp_path / "src")
    png = encoded(Image.new("RGBA", (40, 40), (255, 0, 0, 128)))
    (src / "glioma" / "empty.jpg").write_bytes(b"")
    (src / "glioma" / "notes.jpg").write_text("not an image")
    (src / "meningioma" / "really_png.jpg").write_bytes(png)  # PNG named .jpg
    (src / "pituitary" / "truncated.jpg").write_bytes(
        encoded(Image.new("L", (64, 64), 90), "JPEG")[:200]
    )
    (src / "README.txt").write_text("a file outside any class folder")
    report = ingest(src, tmp_path / "out", max_quarantine_fraction=0.2)
    reasons = {q["source"].removeprefix(f"{src}/"): q["reason"] for q in report.quarantined}
    assert set(reasons) == {
        "glioma/empty.jpg",
        "glioma/notes.jpg",
        "pituitary/truncated.jpg",
        "README.txt",
    }
    assert "empty file" in reasons["glioma/empty.jpg"]
    assert "unrecognised format" in reasons["glioma/notes.jpg"]
    assert "not inside a class folder" in reasons["README.txt"]
    assert report.class_counts["meningioma"] == 13  # the PNG named .jpg was decoded by content
    assert len(pd.read_csv(tmp_path / "out" / QUARANTINE_FILE)) == 4
    assert (tmp_path / "out" / "quarantine" / "primary" / "glioma" / "notes.jpg").is_file()


def test_modes_are_converted_and_recorded(demo_dir: Path, tmp_path: Path) -> None:
    src = copy_tree(demo_dir, tmp_path / "src")
    (src / "glioma" / "rgba.png").write_bytes(encoded(Image.new("RGBA", (40, 36), (9, 9, 9, 99))))
    (src / "glioma" / "palette.png").write_bytes(encoded(Image.new("P", (40, 36), 7)))
    (src / "glioma" / "rgb.jpg").write_bytes(
        encoded(Image.new("RGB", (40, 36), (1, 50, 3)), "JPEG")
    )
    ingest(src, tmp_path / "out")
    manifest = read_manifest(tmp_path / "out" / MANIFEST_FILE).set_index("source")
    assert manifest.loc[str(src / "glioma" / "rgba.png"), "mode"] == "RGBA"
    assert manifest.loc[str(src / "glioma" / "palette.png"), "mode"] == "P"
    assert manifest.loc[str(src / "glioma" / "rgb.jpg"), "width"] == 40


def test_duplicates_collapse_and_label_conflicts_are_excluded(
    demo_dir: Path, tmp_path: Path
) -> None:
    src = copy_tree(demo_dir, tmp_path / "src")
    first = sorted((src / "glioma").iterdir())[0]
    shutil.copy(first, src / "glioma" / "copy_a.png")  # same class: collapses to one
    shutil.copy(first, src / "glioma" / "copy_b.png")
    conflict = sorted((src / "notumor").iterdir())[0]
    shutil.copy(conflict, src / "pituitary" / "same_pixels.png")  # two labels: excluded
    report = ingest(src, tmp_path / "out")
    assert report.class_counts["glioma"] == 12
    kept = min(str(first), str(src / "glioma" / "copy_a.png"))  # the first path is kept
    assert {d["duplicate_of"] for d in report.duplicates} == {kept}
    assert len(report.duplicates) == 2
    assert {c["label"] for c in report.label_conflicts} == {"notumor", "pituitary"}
    assert report.class_counts["notumor"] == 11 and report.class_counts["pituitary"] == 12
    assert len(pd.read_csv(tmp_path / "out" / DUPLICATES_FILE)) == 2
    assert len(pd.read_csv(tmp_path / "out" / CONFLICTS_FILE)) == 2
    manifest = read_manifest(tmp_path / "out" / MANIFEST_FILE)
    assert manifest["content_hash"].is_unique
    assert (
        tmp_path
        / "out"
        / "quarantine"
        / "label_conflict"
        / "primary"
        / "pituitary"
        / "same_pixels.png"
    ).is_file()


def test_too_many_unreadable_files_fail_the_run(demo_dir: Path, tmp_path: Path) -> None:
    src = copy_tree(demo_dir, tmp_path / "src")
    for i in range(6):
        (src / "glioma" / f"broken{i}.jpg").write_bytes(b"junk")
    with pytest.raises(
        DatasetError,
        match=r"6 of 54 files \(11.1%\) are unreadable.*"
        r"max_quarantine_fraction",
    ):
        ingest(src, tmp_path / "out", max_quarantine_fraction=0.1)


def test_class_aliases_and_a_stray_folder(demo_dir: Path, tmp_path: Path) -> None:
    """A folder that is not a class is quarantined and reported (a scheduled run goes on),
    and an error only with ``strict_class_folders``."""
    assert canonical_label("glioma_tumor") == "glioma"
    assert canonical_label("No Tumor") == "notumor"
    src = copy_tree(demo_dir, tmp_path / "src")
    (src / "glioma").rename(src / "glioma_tumor")
    assert ingest(src, tmp_path / "out").class_counts["glioma"] == 12
    (src / "astrocytoma").mkdir()
    (src / "astrocytoma" / "x.png").write_bytes(encoded(Image.new("L", (64, 64), 3)))
    report = ingest(src, tmp_path / "out2")
    [stray] = report.quarantined
    assert (
        stray["category"] == "stray_folder"
        and "unknown class folder 'astrocytoma'" in (stray["reason"])
    )
    assert (tmp_path / "out2" / stray["path"]).is_file()  # kept, not lost
    assert report.total == 48
    with pytest.raises(DatasetError, match="unknown class folder 'astrocytoma'"):
        ingest(src, tmp_path / "out3", strict_class_folders=True)


def test_two_files_mapping_to_one_destination_name_both(demo_dir: Path, tmp_path: Path) -> None:
    src = copy_tree(demo_dir, tmp_path / "src")
    name = sorted((src / "glioma").iterdir())[0].name
    (src / "glioma_tumor").mkdir()
    shutil.copy(src / "glioma" / name, src / "glioma_tumor" / name)
    with pytest.raises(DatasetError) as caught:
        ingest(src, tmp_path / "out")
    message = str(caught.value)
    assert str(src / "glioma" / name) in message and str(src / "glioma_tumor" / name) in message


def test_an_object_key_with_dot_dot_is_an_error_naming_it(
    demo_dir: Path,
    store: ObjectStore,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """AWS S3 stores keys such as ``glioma/../../escape.png`` as they are (the local server
    normalises the URL, so the listing is where the key is injected)."""
    store.upload_dir(demo_dir, S3Uri(bucket, "raw"), progress=False)
    real = ObjectStore.list_keys
    hostile = "raw/glioma/../../escape.png"
    monkeypatch.setattr(ObjectStore, "list_keys", lambda self, uri: [*real(self, uri), hostile])
    with pytest.raises(DatasetError, match=r"glioma/\.\./\.\./escape\.png: .*'\.\.' segment"):
        ingest(f"s3://{bucket}/raw", tmp_path / "out")
    assert not (tmp_path / "escape.png").exists()
    assert not list((tmp_path / "out").rglob("*.png"))  # refused before anything was written


def test_16_bit_images_are_scaled_by_their_range_not_clipped(
    demo_dir: Path, tmp_path: Path
) -> None:
    import numpy as np

    from brainmri.images import decode_image

    ramp = np.linspace(0, 4000, 96 * 96).reshape(96, 96).astype(np.uint16)  # a 12-bit scan
    data = encoded(Image.fromarray(ramp))
    with Image.open(io.BytesIO(data)) as header:
        assert header.mode == "I;16"
        assert np.asarray(header.convert("L")).mean() > 240  # what plain PIL makes of it
    pixels = np.asarray(decode_image(data))
    assert pixels.min() == 0 and pixels.max() == 255 and abs(pixels.mean() - 127.5) < 2
    src = copy_tree(demo_dir, tmp_path / "src")
    (src / "glioma" / "scan16.png").write_bytes(data)
    manifest = read_manifest(ingest(src, tmp_path / "out") and tmp_path / "out" / MANIFEST_FILE)
    assert manifest.set_index("source").loc[str(src / "glioma" / "scan16.png"), "mode"] == "I;16"


def test_tiny_images_are_quarantined_and_hidden_files_listed(
    demo_dir: Path, tmp_path: Path
) -> None:
    src = copy_tree(demo_dir, tmp_path / "src")
    (src / "glioma" / "dot.png").write_bytes(encoded(Image.new("L", (1, 1), 9)))
    (src / "glioma" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (src / "meningioma" / ".thumbs").mkdir()
    (src / "meningioma" / ".thumbs" / "a.png").write_bytes(encoded(Image.new("L", (64, 64))))
    report = ingest(src, tmp_path / "out")
    [tiny] = report.quarantined
    assert tiny["category"] == "too_small" and "1x1 px is too small" in tiny["reason"]
    assert sorted(Path(p).name for p in report.hidden_files) == [".DS_Store", "a.png"]
    assert report.total == 48


def test_empty_class_is_a_clear_error(demo_dir: Path, tmp_path: Path) -> None:
    src = copy_tree(demo_dir, tmp_path / "src")
    shutil.rmtree(src / "pituitary")
    with pytest.raises(DatasetError, match=r"\['pituitary'\] have no usable images"):
        ingest(src, tmp_path / "out")


def test_missing_source_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        ingest(tmp_path / "nowhere", tmp_path / "out")


def test_fingerprint_ignores_names_but_not_content(demo_dir: Path, tmp_path: Path) -> None:
    base = ingest(demo_dir, tmp_path / "a").fingerprint
    src = copy_tree(demo_dir, tmp_path / "src")
    (src / "glioma" / "glioma_0000.png").rename(src / "glioma" / "renamed.png")
    assert ingest(src, tmp_path / "b").fingerprint == base
    shutil.copy(demo_dir / "glioma" / "glioma_0000.png", src / "notumor" / "moved.png")
    (src / "glioma" / "renamed.png").unlink()
    assert ingest(src, tmp_path / "c").fingerprint != base


def test_external_test_set_is_ingested_separately(demo_dir: Path, tmp_path: Path) -> None:
    from brainmri.demo_data import generate_demo_dataset

    external = tmp_path / "external"
    generate_demo_dataset(external, per_class=3, size=64, seed=99, progress=False)
    report = ingest(demo_dir, tmp_path / "out", external_test_source=str(external))
    assert report.external_counts == dict.fromkeys(CLASS_NAMES, 3)
    manifest = read_manifest(tmp_path / "out" / MANIFEST_FILE)
    assert manifest["set"].value_counts().to_dict() == {"primary": 48, "external": 12}


def test_ingests_from_s3(store: ObjectStore, bucket: str, demo_dir: Path, tmp_path: Path) -> None:
    store.upload_dir(demo_dir, S3Uri(bucket, "incoming"), progress=False)
    report = ingest(f"s3://{bucket}/incoming", tmp_path / "out", store=store)
    assert report.total == 48
    manifest = read_manifest(tmp_path / "out" / MANIFEST_FILE)
    assert manifest["source"].str.startswith(f"s3://{bucket}/incoming/").all()


def test_missing_bucket_source(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="bucket 'absent-bucket' does not exist"):
        ingest("s3://absent-bucket/data", tmp_path / "out", store=store)


def test_new_data_decision_and_record(
    store: ObjectStore, bucket: str, demo_dir: Path, tmp_path: Path
) -> None:
    report = ingest(demo_dir, tmp_path / "out")
    uri = record_dataset(store, bucket, "clf", report, str(demo_dir))
    assert uri == dataset_record_uri(bucket, "clf", report.fingerprint)
    assert store.get_json(uri)["class_counts"] == report.class_counts
    same = {"data_fingerprint": report.fingerprint}
    assert check_new_data(report.fingerprint, same, skip_if_unchanged=True)[0] is False
    assert check_new_data(report.fingerprint, same, skip_if_unchanged=False)[0] is True
    assert check_new_data(report.fingerprint, None, skip_if_unchanged=True)[0] is True
    other = {"data_fingerprint": "0" * 64}
    proceed, reason = check_new_data(report.fingerprint, other, skip_if_unchanged=True)
    assert proceed and "new data" in reason


def test_data_report(demo_dir: Path, tmp_path: Path) -> None:
    src = copy_tree(demo_dir, tmp_path / "src")
    (src / "glioma" / "bad.jpg").write_bytes(b"junk")
    report = ingest(src, tmp_path / "out", max_quarantine_fraction=0.5)
    manifest = read_manifest(tmp_path / "out" / MANIFEST_FILE)
    text = render_data_report(report, manifest, tmp_path / "out", str(src))
    assert "| glioma | 12 |" in text and "Quarantined: 1" in text and "| unreadable | 1 |" in text
    assert "bad.jpg" in text and "data:image/jpeg;base64," in text


def test_real_sample_png_named_jpg_and_duplicates(real_sample_dir: Path, tmp_path: Path) -> None:
    """Real slices: PNGs named .jpg (RGB, RGBA, P) decode; a known duplicate group collapses."""
    src = tmp_path / "src"
    picks = [*PNG_NAMED_JPG, *DUPLICATE_GROUP]
    for label in CLASS_NAMES:  # plus a few ordinary slices so every class is present
        picks += [f"{label}/{p.name}" for p in sorted((real_sample_dir / label).iterdir())[:3]]
    for rel in picks:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(real_sample_dir / rel, src / rel)
    report = ingest(src, tmp_path / "out")
    assert not report.quarantined and not report.label_conflicts
    manifest = read_manifest(tmp_path / "out" / MANIFEST_FILE)
    sources = set(manifest["source"].str.removeprefix(f"{src}/"))
    assert set(PNG_NAMED_JPG) <= sources
    assert len(report.duplicates) == 2
    assert {d["duplicate_of"] for d in report.duplicates} == {str(src / DUPLICATE_GROUP[0])}

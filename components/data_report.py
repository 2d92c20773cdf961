"""The data report: what ingest found, as Markdown for the KFP UI (with an inline sample grid)."""

import base64
import io
from pathlib import Path

import pandas as pd
from PIL import Image

from brainmri.images import decode_image
from components.ingest import IngestReport
from components.report import markdown_table

SIZE_BINS = [0, 256, 512, 1024, float("inf")]
SIZE_LABELS = ["< 256 px", "256–511 px", "512–1023 px", "≥ 1024 px"]


def _table(frame: pd.DataFrame) -> str:
    return "\n".join(markdown_table(frame.columns, list(frame.itertuples(index=False))))


def sample_grid(
    manifest: pd.DataFrame, dataset_dir: Path, per_class: int = 4, thumb: int = 96
) -> str:
    """A JPEG grid (one row per class) as a ``data:`` URI."""
    labels = sorted(manifest["label"].unique())
    grid = Image.new("RGB", (thumb * per_class, thumb * max(len(labels), 1)))
    for row, label in enumerate(labels):
        paths = manifest.loc[manifest["label"] == label, "path"].head(per_class)
        for col, rel in enumerate(paths):
            image = decode_image(Path(dataset_dir) / rel)
            image.thumbnail((thumb, thumb))
            grid.paste(image, (col * thumb, row * thumb))
    buffer = io.BytesIO()
    grid.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def render_data_report(
    report: IngestReport, manifest: pd.DataFrame, dataset_dir: Path, source: str
) -> str:
    """Class counts, size histogram, modes, duplicates, conflicts, quarantine and samples."""
    counts = pd.DataFrame(
        {"class": list(report.class_counts), "images": list(report.class_counts.values())}
    )
    longest = manifest[["width", "height"]].max(axis=1)
    sizes = pd.cut(longest, SIZE_BINS, labels=SIZE_LABELS, right=False).value_counts(sort=False)
    modes = manifest["mode"].value_counts()
    parts = [
        "# Data report",
        f"Source: `{source}` · files seen: {report.files_seen} · usable images: {report.total} "
        f"· dataset fingerprint: `{report.fingerprint[:16]}`",
        "## Images per class",
        _table(counts),
        "## Image size (longest side)",
        _table(pd.DataFrame({"size": sizes.index.astype(str), "images": sizes.values})),
        "## Modes in the files (all converted to RGB)",
        _table(pd.DataFrame({"mode": modes.index, "images": modes.values})),
        f"## Exact duplicates collapsed: {len(report.duplicates)}",
        f"## Label conflicts excluded: {len(report.label_conflicts)}",
        f"## Quarantined (unreadable): {len(report.quarantined)}",
    ]
    if report.external_counts:
        parts.insert(
            4,
            "## External test set\n"
            + _table(
                pd.DataFrame(
                    {
                        "class": list(report.external_counts),
                        "images": list(report.external_counts.values()),
                    }
                )
            ),
        )
    for title, rows, columns in (
        ("Label conflicts", report.label_conflicts, ["source", "labels"]),
        ("Quarantine", report.quarantined, ["source", "reason"]),
    ):
        if rows:
            parts.append(f"### {title} (first 20)\n" + _table(pd.DataFrame(rows)[columns].head(20)))
    if len(manifest):
        parts += ["## Samples", f"![samples per class]({sample_grid(manifest, dataset_dir)})"]
    return "\n\n".join(parts) + "\n"

"""The data report: what ingest found, as Markdown for the KFP UI (with an inline sample grid,
and the near-duplicate pairs at each threshold side by side)."""

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
    return _jpeg_uri(grid)


def _jpeg_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _thumbnail(path: Path, size: int = 96) -> str:
    """A JPEG thumbnail of a stored image as a ``data:`` URI."""
    image = decode_image(path)
    image.thumbnail((size, size))
    return _jpeg_uri(image)


def near_duplicate_section(summary: dict, dataset_dir: Path) -> list[str]:
    """Copies collapsed, groups and their sizes, and the least similar pairs still within each
    threshold, side by side, so the thresholds can be judged by eye."""
    if not summary:
        return []
    thresholds = summary["thresholds"]
    parts = [
        "## Copies and near-duplicates",
        f"Thumbnails compared: 64 px greyscale, mean absolute difference in grey levels, "
        f"mirror-aware. Copies (within {thresholds['copy']}): "
        f"{summary['identical_collapsed']} identical and {summary['copies_collapsed']} "
        f"re-encoded, resized or mirrored copies collapsed to one per class; "
        f"{summary['label_conflicts']} images excluded as copies under two labels. "
        f"Pairs within {thresholds['neighbour']} (copies and neighbouring slices): "
        f"{sum(summary['pairs'].values())}. They join {summary['images_in_groups']} images into "
        f"{summary['groups']} groups (largest: {summary['largest_group']}); the split keeps each "
        "group on one side.",
        _table(
            pd.DataFrame(
                {
                    "group size": list(summary["group_sizes"]),
                    "groups": summary["group_sizes"].values(),
                }
            )
        ),
    ]
    titles = {"copy": "copy", "neighbour": "neighbour"}
    for kind, title in titles.items():
        samples = summary["samples"].get(kind) or []
        if not samples:
            continue
        rows = [
            (
                f"{pair['distance']:.2f}",
                f"![a]({_thumbnail(Path(dataset_dir) / pair['path_a'])})",
                f"![b]({_thumbnail(Path(dataset_dir) / pair['path_b'])})",
                f"`{pair['path_a']}` / `{pair['path_b']}`",
            )
            for pair in samples
        ]
        parts.append(
            f"### The least similar pairs still called {title}s (threshold "
            f"{thresholds[kind]})\n"
            + "\n".join(markdown_table(("distance", "image", "image", "files"), rows))
        )
    return parts


def _quarantine_categories(report: IngestReport) -> list[str]:
    """The quarantine counted by why (unreadable, too small, outside or beside the classes)."""
    if not report.quarantined:
        return []
    categories = pd.Series([q["category"] for q in report.quarantined]).value_counts()
    return [_table(pd.DataFrame({"why": categories.index, "files": categories.values}))]


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
        f"## Duplicates collapsed: {len(report.duplicates)}",
        f"## Label conflicts excluded: {len(report.label_conflicts)}",
        f"## Quarantined: {len(report.quarantined)}",
        *_quarantine_categories(report),
        f"## Hidden files left out: {len(report.hidden_files)}",
        *near_duplicate_section(report.near_duplicates, dataset_dir),
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
        ("Quarantine", report.quarantined, ["source", "category", "reason"]),
        ("Hidden files", [{"source": h} for h in report.hidden_files], ["source"]),
    ):
        if rows:
            parts.append(f"### {title} (first 20)\n" + _table(pd.DataFrame(rows)[columns].head(20)))
    if len(manifest):
        parts += ["## Samples", f"![samples per class]({sample_grid(manifest, dataset_dir)})"]
    return "\n\n".join(parts) + "\n"

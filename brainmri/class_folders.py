"""The class-per-folder layout of image trees: ``<root>/<class>/<any folders>/<image>``.

Ingest and evaluation both read such trees, from a local folder or an ``s3://`` prefix, through
:func:`list_labelled_files`; folder names map to the classes with :func:`canonical_label`,
which also knows the folder names other releases of the public data set use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from brainmri import CLASS_NAMES
from brainmri.storage import ObjectStore, is_s3_uri, list_files

# folder names used by other releases of the data set -> canonical label
CLASS_ALIASES = {
    "glioma_tumor": "glioma",
    "meningioma_tumor": "meningioma",
    "no_tumor": "notumor",
    "pituitary_tumor": "pituitary",
    "no": "notumor",
    "normal": "notumor",
}
UNLABELLED = "_unlabelled"  # where files outside every class folder are put


class DatasetError(ValueError):
    """The source data cannot make a usable data set; the message names the folder or file."""


@dataclass(frozen=True)
class LabelledFile:
    """One file of a class-per-folder tree."""

    label: str | None  # None: not inside a class folder
    relpath: str  # <label>/<path below the class folder>, or _unlabelled/<name>
    found_at: str  # the path below the root as found (original folder names)
    source: str  # the original path or s3:// URI
    read: Callable[[], bytes]


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


def list_labelled_files(location: str, store: ObjectStore | None = None) -> list[LabelledFile]:
    """Every file of the tree at ``location`` (a folder or ``s3://bucket/prefix``) with its
    label, in a stable order. An unknown class folder (empty ones included), a missing folder
    or a tree without files is a :class:`DatasetError` naming it."""
    if not is_s3_uri(location) and Path(location).is_dir():
        for folder in Path(location).iterdir():
            if folder.is_dir() and not folder.name.startswith("."):
                canonical_label(folder.name)
    try:
        files = list_files(location, store)
    except FileNotFoundError as err:
        raise DatasetError(f"source {err}") from err
    if not files:
        raise DatasetError(f"{location} holds no files; expected <class>/<image> files")
    labelled = []
    for file in files:
        found_at = "/".join(file.parts)
        if len(file.parts) < 2:  # directly in the root: kept, but it has no class
            label, relpath = None, f"{UNLABELLED}/{file.parts[-1]}"
        else:
            label = canonical_label(file.parts[0])
            relpath = "/".join((label, *file.parts[1:]))
        labelled.append(LabelledFile(label, relpath, found_at, file.source, file.read))
    return labelled

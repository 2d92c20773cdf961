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
from brainmri.dicomweb import DicomwebSource, is_dicomweb, list_pacs_files
from brainmri.storage import ObjectStore, is_hidden, is_s3_uri, list_files

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


# why a file is not a training image before it is even decoded (LabelledFile.problem)
HIDDEN = "hidden"  # a .name file or inside a .folder: listed, never ingested
NO_CLASS = "outside_classes"  # directly in the root
STRAY_FOLDER = "stray_folder"  # inside a folder that is not a class
STRAY = "_stray"  # where files of stray folders are put


@dataclass(frozen=True)
class LabelledFile:
    """One file of a class-per-folder tree."""

    label: str | None  # None: not inside a class folder
    relpath: str  # <label>/<path below the class folder>, _unlabelled/<name> or _stray/<path>
    found_at: str  # the path below the root as found (original folder names)
    source: str  # the original path or s3:// URI
    read: Callable[[], bytes]
    problem: str | None = None  # HIDDEN, NO_CLASS or STRAY_FOLDER; None for a class's file
    reason: str = ""  # the problem in words, with what to do

    @property
    def is_hidden(self) -> bool:
        return self.problem == HIDDEN


def class_of(folder: str) -> str | None:
    """The class a folder name stands for (:data:`CLASS_NAMES` or an alias), else None."""
    name = folder.strip().lower().replace("-", "_").replace(" ", "_")
    return name if name in CLASS_NAMES else CLASS_ALIASES.get(name)


def canonical_label(folder: str) -> str:
    """Map a class folder name to one of :data:`CLASS_NAMES`, or fail naming the folder."""
    label = class_of(folder)
    if label is None:
        raise DatasetError(_unknown_folder(folder))
    return label


def _unknown_folder(folder: str) -> str:
    return (
        f"unknown class folder '{folder}': expected one of {list(CLASS_NAMES)} "
        f"or an alias {sorted(CLASS_ALIASES)}; rename or remove it"
    )


def _classify(parts: tuple[str, ...], source: str, read: Callable[[], bytes]) -> LabelledFile:
    found_at = "/".join(parts)
    if any(part in ("", ".", "..") for part in parts):
        raise DatasetError(
            f"{source}: its path has an empty, '.' or '..' segment, which could write outside "
            "the dataset folder; rename the object to a plain <class>/<image> key"
        )
    if is_hidden(parts):
        reason = "hidden file (a '.' name or inside a '.' folder): left out"
        return LabelledFile(None, found_at, found_at, source, read, HIDDEN, reason)
    if len(parts) < 2:  # directly in the root: kept, but it has no class
        reason = "not inside a class folder; move it into <class>/"
        return LabelledFile(
            None, f"{UNLABELLED}/{parts[-1]}", found_at, source, read, NO_CLASS, reason
        )
    label = class_of(parts[0])
    if label is None:
        reason = _unknown_folder(parts[0])
        return LabelledFile(
            None, f"{STRAY}/{found_at}", found_at, source, read, STRAY_FOLDER, reason
        )
    return LabelledFile(label, "/".join((label, *parts[1:])), found_at, source, read)


def _refuse_collisions(files: list[LabelledFile]) -> None:
    """Two source files that would be stored at one path (``glioma/a.png`` and
    ``glioma_tumor/a.png``) are an error naming both: neither may silently replace the other."""
    seen: dict[str, LabelledFile] = {}
    for file in files:
        key = file.relpath.lower()  # case-insensitive file systems would merge these too
        if key in seen and not file.is_hidden:
            raise DatasetError(
                f"{seen[key].source} and {file.source} both map to {file.relpath} (their class "
                "folders are aliases of one class); rename one of them"
            )
        seen[key] = file


def list_labelled_files(
    location: str, store: ObjectStore | None = None, *, strict: bool = False
) -> list[LabelledFile]:
    """Every file of the tree at ``location`` (a folder or ``s3://bucket/prefix``) with its
    label, in a stable order, hidden files and files outside the class folders included with
    their :attr:`~LabelledFile.problem`. A folder that is not a class is a
    :class:`DatasetError` only when ``strict`` (empty ones included); a path with ``..``, two
    files mapping to one path, a missing folder or a tree without files always are."""
    if strict and not is_s3_uri(location) and Path(location).is_dir():
        for folder in Path(location).iterdir():
            if folder.is_dir() and not folder.name.startswith("."):
                canonical_label(folder.name)
    if is_dicomweb(location):  # a PACS: its labels file stands in for the class folders
        shown = DicomwebSource.parse(location).shown
        files = [
            _classify((f.label_text, *f.name.split("/")), f"{shown}/{f.name}", f.read)
            for f in list_pacs_files(location, store)
        ]
    else:
        try:
            stored = list_files(location, store)
        except FileNotFoundError as err:
            raise DatasetError(f"source {err}") from err
        files = [_classify(f.parts, f.source, f.read) for f in stored]
    if not any(f.label for f in files):
        found = f"only {len(files)} file(s) outside every class folder" if files else "no files"
        raise DatasetError(f"{location} holds {found}; expected <class>/<image> files")
    if strict:
        for file in files:
            if file.problem == STRAY_FOLDER:
                raise DatasetError(f"{file.source}: {file.reason} (strict class folders)")
    _refuse_collisions(files)
    return files

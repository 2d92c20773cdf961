"""A PACS as a source: ``dicomweb+http://host:port/dicom-web?labels=<labels.csv>`` (or https).

The labels file (a local path or ``s3://`` URI) is a CSV with a ``label`` column (a class or an
alias) and either ``StudyInstanceUID`` or ``SeriesInstanceUID``. Each row's instances are found
with QIDO-RS (paged) and fetched one by one with WADO-RS (``dicomweb-client``) only when ingest
reads them, a few at a time, so memory holds a handful of instances whatever the study sizes.
Calls are retried with backoff on connection errors and 5xx answers. Credentials come from the
environment only:

| variable                | meaning                                        |
|-------------------------|------------------------------------------------|
| ``DICOMWEB_USERNAME``   | HTTP basic user (with ``DICOMWEB_PASSWORD``)   |
| ``DICOMWEB_PASSWORD``   | its password                                   |
| ``DICOMWEB_TOKEN``      | a bearer token instead                         |

Nothing of the PACS's identifiers leaves this module: an instance is named by the salted hashes
of its study, series and SOP instance UIDs (:func:`brainmri.dicom.identifier_key`).
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit, urlunsplit

import pandas as pd
import requests
from requests.adapters import HTTPAdapter
from tqdm import tqdm
from urllib3.util.retry import Retry

from brainmri.dicom import identifier_key, salt_from_env
from brainmri.storage import ObjectStore, S3Uri, StorageError, is_s3_uri

SCHEME_PREFIX = "dicomweb+"
STUDY, SERIES, SOP = "0020000D", "0020000E", "00080018"  # DICOM JSON tags of the three UIDs
UID_COLUMNS = {"StudyInstanceUID": STUDY, "SeriesInstanceUID": SERIES}
PAGE = 500  # instances per QIDO-RS page
RETRIES = Retry(
    total=5,
    backoff_factor=0.5,
    status_forcelist=(500, 502, 503, 504),
    allowed_methods=("GET",),
    raise_on_status=False,
)


UID_PATTERN = re.compile(r"\b[0-2](?:\.\d+){3,}\b")  # a DICOM UID: dotted digits


class RedactUids(logging.Filter):
    """Replace every DICOM UID in a log record by ``<uid>``: dicomweb-client logs the UIDs of
    what it searches and retrieves, and urllib3 the URLs it retries."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if UID_PATTERN.search(message):
            record.msg, record.args = UID_PATTERN.sub("<uid>", message), None
        return True


def redact_client_logs() -> None:
    """Install :class:`RedactUids` on the loggers of dicomweb-client and urllib3 (once)."""
    names = [
        name
        for name in logging.root.manager.loggerDict
        if name.startswith(("dicomweb_client", "urllib3"))
    ]
    for name in {"dicomweb_client.web", "urllib3.connectionpool", *names}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactUids) for f in logger.filters):
            logger.addFilter(RedactUids())


class PacsError(StorageError):
    """The PACS or the labels file cannot be read; the message says which and what to do."""


def is_dicomweb(location: str) -> bool:
    return location.startswith(SCHEME_PREFIX)


@dataclass(frozen=True)
class DicomwebSource:
    """A parsed ``dicomweb+http(s)://...?labels=...`` source."""

    url: str  # the DICOMweb root, e.g. http://pacs:8042/dicom-web
    labels: str

    @classmethod
    def parse(cls, location: str) -> DicomwebSource:
        parts = urlsplit(location.removeprefix(SCHEME_PREFIX))
        labels = parse_qs(parts.query).get("labels", [""])[0]
        if parts.scheme not in ("http", "https") or not parts.netloc or not labels:
            raise PacsError(
                f"{location!r}: expected dicomweb+http(s)://host:port/<root>?labels=<labels.csv> "
                "(the labels file maps StudyInstanceUID or SeriesInstanceUID to a class)"
            )
        url = urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
        return cls(url, labels)

    @property
    def shown(self) -> str:
        """The source as reports name it (no query)."""
        return f"{SCHEME_PREFIX}{self.url}"


def pacs_session(
    env: Mapping[str, str] | None = None, retries: Retry = RETRIES
) -> requests.Session:
    """A session with ``retries`` and the credentials of the environment."""
    env = os.environ if env is None else env
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retries)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if env.get("DICOMWEB_TOKEN"):
        session.headers["Authorization"] = f"Bearer {env['DICOMWEB_TOKEN']}"
    elif env.get("DICOMWEB_USERNAME"):
        session.auth = (env["DICOMWEB_USERNAME"], env.get("DICOMWEB_PASSWORD", ""))
    return session


def read_labels(location: str, store: ObjectStore | None = None) -> pd.DataFrame:
    """The labels file: one UID column and ``label``."""
    try:
        data = (
            (store or ObjectStore()).get_bytes(S3Uri.parse(location))
            if is_s3_uri(location)
            else open(location, "rb").read()  # noqa: SIM115 - read at once
        )
        frame = pd.read_csv(io.BytesIO(data), dtype=str)
    except (OSError, ValueError) as err:
        raise PacsError(f"labels file {location}: cannot be read ({err})") from err
    columns = [c for c in UID_COLUMNS if c in frame]
    if len(columns) != 1 or "label" not in frame:
        raise PacsError(
            f"labels file {location}: needs a 'label' column and one of "
            f"{', '.join(UID_COLUMNS)}; it has {', '.join(frame.columns)}"
        )
    return frame[[columns[0], "label"]].dropna()


@dataclass(frozen=True)
class PacsInstance:
    """One instance found in the PACS: its UIDs (kept in memory only) and its label's text."""

    study: str
    series: str
    sop: str
    label: str


def _uid(item: dict, tag: str) -> str:
    return str(item.get(tag, {}).get("Value", [""])[0])


def find_instances(source: DicomwebSource, client, labels: pd.DataFrame) -> list[PacsInstance]:  # noqa: ANN001
    """QIDO-RS, page by page, for every row of ``labels``."""
    column = labels.columns[0]
    found: list[PacsInstance] = []
    rows = list(labels.itertuples(index=False))
    for number, (uid, label) in enumerate(tqdm(rows, desc="find in PACS", unit="row"), start=2):
        offset, before = 0, len(found)
        while True:
            keys = {"study_instance_uid": uid} if column == "StudyInstanceUID" else {}
            filters = {} if keys else {"SeriesInstanceUID": uid}
            try:
                page = client.search_for_instances(
                    **keys, search_filters=filters, limit=PAGE, offset=offset
                )
            except requests.RequestException as err:
                raise PacsError(f"{source.shown}: QIDO-RS failed ({_no_uids(err)})") from err
            found += [
                PacsInstance(_uid(i, STUDY) or uid, _uid(i, SERIES), _uid(i, SOP), label)
                for i in page
            ]
            if len(page) < PAGE:
                break
            offset += PAGE
        if len(found) == before:
            raise PacsError(
                f"labels file {source.labels} line {number}: no instance of that {column} in "
                f"{source.shown}; check the UID or remove the row"
            )
    return found


def _no_uids(err: Exception) -> str:
    """An HTTP error without its URL (which holds UIDs): the status and reason only."""
    response = getattr(err, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason}"
    return type(err).__name__


def instance_reader(
    source: DicomwebSource,
    client,
    instance: PacsInstance,  # noqa: ANN001
) -> Callable[[], bytes]:
    """Fetch the instance with WADO-RS, as a DICOM Part 10 file's bytes."""

    def read() -> bytes:
        from pydicom import dcmwrite

        try:
            ds = client.retrieve_instance(instance.study, instance.series, instance.sop)
        except requests.RequestException as err:
            raise PacsError(f"{source.shown}: WADO-RS failed ({_no_uids(err)})") from err
        out = io.BytesIO()
        dcmwrite(out, ds, enforce_file_format=True)
        return out.getvalue()

    return read


@dataclass(frozen=True)
class PacsFile:
    """What ingest needs of one PACS instance (the shape of a class folder's file)."""

    label_text: str
    name: str  # <study key>/<series key>/<instance key>: salted hashes only
    read: Callable[[], bytes]


def list_pacs_files(location: str, store: ObjectStore | None = None) -> list[PacsFile]:
    """Every instance the labels file names, found in the PACS; nothing fetched yet."""
    from dicomweb_client.api import DICOMwebClient

    redact_client_logs()
    source = DicomwebSource.parse(location)
    labels = read_labels(source.labels, store)
    salt = salt_from_env()
    try:  # reachable, and the credentials accepted: asked once, before any retrying client
        probe = pacs_session(retries=Retry(total=1, backoff_factor=0.2, raise_on_status=False))
        probe.get(f"{source.url}/studies", params={"limit": 1}, timeout=10).raise_for_status()
    except requests.RequestException as err:
        raise PacsError(
            f"{source.shown} is not answering DICOMweb ({_no_uids(err)}): check the address and "
            "DICOMWEB_USERNAME/DICOMWEB_PASSWORD (or DICOMWEB_TOKEN)"
        ) from err
    client = DICOMwebClient(url=source.url, session=pacs_session())
    files = []
    for instance in find_instances(source, client, labels):
        name = "/".join(
            identifier_key(uid, salt) for uid in (instance.study, instance.series, instance.sop)
        )
        files.append(PacsFile(instance.label, name, instance_reader(source, client, instance)))
    return files

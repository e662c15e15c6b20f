"""deploy/k8s (Kustomize base + example overlay) and docker-compose.yml: valid, complete and in step.

No container engine or cluster runs here, so: the Kubernetes manifests are rendered (``kubectl kustomize``
where kubectl exists, and always by reading each kustomization's ``resources`` list) and every object is
checked against the Kubernetes OpenAPI schemas with ``kubernetes-validate`` (strict: unknown fields fail);
the compose file is checked by ``docker compose config`` where the compose plugin exists, and always
structurally. Every FLASH_ variable either file sets must be one the code reads.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controlplane.cli import SERVICES
from servicekit.runtime import SHUTDOWN_BOUND_S
from servicekit.settings import FlashSettings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"


def _read_by_code() -> set[str]:
    quoted = re.compile(r"[\"'](FLASH_[A-Z0-9_]*[A-Z0-9])[\"']")
    direct = {m for folder in ("libs", "services") for path in (ROOT / folder).rglob("*.py")
              for m in quoted.findall(path.read_text())}
    return {f"FLASH_{n.upper()}" for n in FlashSettings.model_fields} | direct


def _render_resources(folder: Path) -> list[dict[str, Any]]:
    """The objects a kustomization lists, following ``resources`` recursively (no patches applied)."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    docs: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        if path.is_dir():
            docs.extend(_render_resources(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _kubectl_render(folder: Path) -> list[dict[str, Any]] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return list(doc["spec"]["template"]["spec"]["containers"])


def _env_names(docs: list[dict[str, Any]]) -> set[str]:
    names: set[str] = set()
    for doc in docs:
        if doc["kind"] == "ConfigMap":
            names |= set(doc.get("data", {}))
        if doc["kind"] in ("Deployment", "Job"):
            for c in _containers(doc):
                names |= {e["name"] for e in c.get("env", [])}
    return {n for n in names if n.startswith("FLASH_")}


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return _render_resources(K8S / "base")


@pytest.mark.parametrize("folder", ["base", "overlays/example"])
def test_every_object_validates_against_the_kubernetes_schemas(folder: str) -> None:
    docs = _render_resources(K8S / folder)
    rendered = _kubectl_render(K8S / folder)
    if rendered is not None:  # the real thing: patches, generators, images and namespace applied
        docs += rendered
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_validator_rejects_a_broken_manifest(base: list[dict[str, Any]]) -> None:
    """The schema check can fail: a misspelt field and a wrong type are caught."""
    broken = yaml.safe_load(yaml.safe_dump(next(d for d in base if d["kind"] == "Deployment")))
    broken["spec"]["template"]["spec"]["containers"][0]["resourcez"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(next(d for d in base if d["kind"] == "Deployment")))
    broken["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_a_deployment_and_a_disruption_budget_per_service(base: list[dict[str, Any]]) -> None:
    deployments = {d["metadata"]["name"]: d for d in base if d["kind"] == "Deployment"}
    assert set(deployments) == set(SERVICES)
    budgets = {d["metadata"]["name"]: d for d in base if d["kind"] == "PodDisruptionBudget"}
    assert set(budgets) == set(SERVICES)
    for name, dep in deployments.items():
        assert budgets[name]["spec"]["selector"] == dep["spec"]["selector"]
        [c] = _containers(dep)
        assert c["args"] == ["run", name]
        assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"]
        assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["cpu"]
        probes = {k: " ".join(c[k]["exec"]["command"]) for k in ("livenessProbe", "readinessProbe", "startupProbe")}
        assert "/healthz" in probes["livenessProbe"] and "/readyz" in probes["readinessProbe"]
        assert all("FLASH_METRICS_PORT" in p for p in probes.values())
        # the pod is given longer than the documented shutdown bound before it is killed
        assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > SHUTDOWN_BOUND_S
        env = {e["name"]: e for e in c["env"]}
        assert env["FLASH_INSTANCE_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert "secretKeyRef" in env["FLASH_SECRET_KEY"]["valueFrom"]
        assert "secretKeyRef" in env["FLASH_DATABASE_URL"]["valueFrom"]


def test_a_job_migrates_and_creates_topics(base: list[dict[str, Any]]) -> None:
    [job] = [d for d in base if d["kind"] == "Job"]
    assert _containers(job)[0]["args"] == ["migrate", "--topics"]
    settings = next(d for d in base if d["kind"] == "ConfigMap")
    assert settings["data"]["FLASH_METRICS_PORT"]  # the probes need it


def test_every_flash_setting_in_the_manifests_and_compose_is_read_by_the_code(base: list[dict[str, Any]]) -> None:
    known = _read_by_code()
    overlay = yaml.safe_load((K8S / "overlays/example/kustomization.yaml").read_text())
    literals = {lit.split("=", 1)[0] for g in overlay.get("configMapGenerator", []) for lit in g.get("literals", [])}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    compose_env = {k for svc in compose["services"].values() for k in (svc.get("environment") or {})
                   if k.startswith("FLASH_")}
    for where, names in (("deploy/k8s/base", _env_names(base)), ("overlay", literals), ("compose", compose_env)):
        assert names, where
        assert names - known == set(), f"{where} sets variables no code reads"


def test_compose_runs_every_service_like_the_manifests() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in SERVICES:
        svc = services[name]
        assert svc["command"] == ["run", name]
        assert "/readyz" in " ".join(svc["healthcheck"]["test"])
        assert svc["environment"]["FLASH_METRICS_PORT"]
        grace = int(str(svc["stop_grace_period"]).rstrip("s"))
        assert grace > SHUTDOWN_BOUND_S
        assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["migrate"]["command"] == ["migrate", "--topics"]
    # a single broker: topics need replication 1 there
    assert services["ce-poller"]["environment"]["FLASH_KAFKA_REPLICATION_FACTOR"] == "1"


def _compose_command() -> list[str] | None:
    """``docker compose`` (the plugin), else the standalone ``docker-compose``, else None."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=30, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    compose = _compose_command()
    if compose is None:
        pytest.skip("neither `docker compose` (plugin) nor `docker-compose` is installed here: the compose file's "
                    "structure is checked above, `docker compose config` cannot run")
    env = {"FLASH_SECRET_KEY": "x" * 44, "PATH": "/usr/bin:/bin:/usr/local/bin"}

    def config(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*compose, "-f", str(path), "config", "--quiet"], capture_output=True, text=True,
                              timeout=60, check=False, cwd=ROOT, env=env)

    out = config(ROOT / "docker-compose.yml")
    assert out.returncode == 0, out.stderr
    # and the check can fail: a misspelt option is refused
    bad = tmp_path / "docker-compose.yml"
    bad.write_text((ROOT / "docker-compose.yml").read_text().replace("stop_grace_period:", "stop_grace_periodd:"))
    assert config(bad).returncode != 0

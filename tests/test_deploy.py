"""The Kubernetes manifests and the Prometheus config: valid, complete and in step.

Every resource the kustomization lists is validated against the Kubernetes API
schemas (kubernetes-validate, strict: unknown fields fail), and the settings they
pass are real RECSVC_ settings. No cluster is needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from app.settings import Settings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
K8S = DEPLOY / "k8s"
KUBERNETES_VERSION = "1.30.0"


def _kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _documents() -> list[tuple[str, dict]]:
    docs = []
    for name in _kustomization()["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc:
                docs.append((name, doc))
    return docs


def _by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in _documents() if d["kind"] == kind}


def test_every_listed_resource_exists_and_every_manifest_is_listed():
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("name,doc", _documents(),
                         ids=[f"{n}:{d['kind']}" for n, d in _documents()])
def test_manifest_is_valid_against_the_kubernetes_schema(name, doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_settings_passed_to_the_pods_are_real_settings():
    known = {f"RECSVC_{n.upper()}" for n in Settings.model_fields}
    passed = set(_by_kind("ConfigMap")["recsvc-settings"]["data"])
    secret = set(_by_kind("Secret")["recsvc-keys"]["stringData"])
    assert secret - {"REDIS_PASSWORD"} <= known  # the one for Redis itself
    passed |= secret - {"REDIS_PASSWORD"}
    for deployment in _by_kind("Deployment").values():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            passed |= {e["name"] for e in container.get("env", [])}
    assert passed <= known, passed - known


def test_api_and_learner_deployments_have_probes_and_the_roles_they_need():
    deployments = _by_kind("Deployment")
    api = deployments["recsvc-api"]["spec"]["template"]["spec"]["containers"][0]
    learner = deployments["recsvc-learner"]["spec"]["template"]["spec"]["containers"][0]
    for container in (api, learner):
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"name": "RECSVC_ROLE", "value": "api"} in api["env"]
    assert learner["args"][:2] == ["recsvc", "learner"]
    assert deployments["recsvc-learner"]["spec"]["replicas"] == 2  # one active, one standby
    hpa = _by_kind("HorizontalPodAutoscaler")["recsvc-api"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "recsvc-api"
    assert hpa["metrics"][0]["resource"]["name"] == "cpu"
    redis = _by_kind("StatefulSet")["recsvc-redis"]["spec"]
    assert "--appendonly" in redis["template"]["spec"]["containers"][0]["args"]
    assert redis["volumeClaimTemplates"]


def test_prometheus_config_scrapes_both_roles_and_the_configmap_matches_it():
    config_text = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    config = yaml.safe_load(config_text)
    jobs = {j["job_name"] for j in config["scrape_configs"]}
    assert {"recsvc-pods", "recsvc-compose"} <= jobs
    assert _by_kind("ConfigMap")["recsvc-prometheus"]["data"]["prometheus.yml"] == config_text
    for deployment in _by_kind("Deployment").values():
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"


def test_what_ships_is_closed_by_default():
    """No usable keys or passwords ship; Redis needs a password and only recsvc's pods
    reach it; containers cannot escalate, write their root filesystem or keep
    capabilities (at 3b796b0: placeholder keys that worked, an open Redis, no
    NetworkPolicy, and none of these security contexts)."""
    secret = _by_kind("Secret")["recsvc-keys"]["stringData"]
    assert all(v == "" for v in secret.values()), secret
    redis = _by_kind("StatefulSet")["recsvc-redis"]["spec"]["template"]["spec"]
    assert "--requirepass" in redis["containers"][0]["args"]
    policy = _by_kind("NetworkPolicy")["recsvc-redis"]["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == "recsvc-redis"
    allowed = policy["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"]
    assert set(allowed) == {"recsvc-api", "recsvc-learner"}
    for deployment in _by_kind("Deployment").values():
        spec = deployment["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["capabilities"]["drop"] == ["ALL"]
            refs = {e["secretRef"]["name"] for e in container["envFrom"] if "secretRef" in e}
            assert refs == {"recsvc-keys"}  # keys and the Redis URL come from the Secret
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    for name in ("api", "learner"):
        env = compose["services"][name]["environment"]
        assert ":?" in env["RECSVC_API_KEYS"] and ":?" in env["RECSVC_ADMIN_KEYS"]
        assert "RECSVC_REDIS_PASSWORD" in env["RECSVC_REDIS_URL"]
    assert "--requirepass" in " ".join(compose["services"]["redis"]["command"])


def _exported() -> str:
    """The exposition of an API process and of a learner process, values aside."""
    from prometheus_client import generate_latest

    from app.learner.process import create_learner_app
    from app.metrics import Metrics

    learner = create_learner_app(Settings(redis_url="redis://127.0.0.1:1/0"))
    return (generate_latest(Metrics().registry).decode()
            + generate_latest(learner.state.registry).decode())


def _recsvc_names(exprs: list[str]) -> set[str]:
    return {name for expr in exprs for name in re.findall(r"recsvc_[a-z_]+", expr)}


def test_alert_rules_and_the_dashboard_use_only_metrics_that_are_exported():
    """A rule or a panel on a metric nobody exports never fires or draws: every
    recsvc_ name they use is one an API or a learner process exposes (a histogram's
    _bucket and _count series by its name)."""
    exported = _exported()
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "recsvc.json").read_text())
    for exprs in ([rule["expr"] for group in rules["groups"] for rule in group["rules"]],
                  [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]):
        used = _recsvc_names(exprs)
        missing = {name for name in used if f"# TYPE {name} " not in exported
                   and f"# TYPE {re.sub('_(bucket|count|sum)$', '', name)} " not in exported}
        assert used and not missing, missing


def test_prometheus_loads_the_alert_rules_and_grafana_the_dashboard():
    """The observability profile wires the files together: Prometheus reads the rules
    from beside its config (in compose and in the cluster's ConfigMap alike), Grafana
    is provisioned with the data source the dashboard names."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    configmap = _by_kind("ConfigMap")["recsvc-prometheus"]["data"]
    assert configmap["alerts.yml"] == (DEPLOY / "prometheus" / "alerts.yml").read_text()
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    services = compose["services"]
    assert services["prometheus"]["profiles"] == services["grafana"]["profiles"] == [
        "observability"]
    assert any(v.endswith(":/etc/prometheus/alerts.yml:ro")
               for v in services["prometheus"]["volumes"])
    source = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources"
                             / "prometheus.yml").read_text())["datasources"][0]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "recsvc.json").read_text())
    assert {p["datasource"]["uid"] for p in dashboard["panels"] if "targets" in p} == {
        source["uid"]}
    # no login at all: nothing to guess, no default admin password shipped
    assert services["grafana"]["environment"]["GF_AUTH_DISABLE_LOGIN_FORM"] == "true"
    assert all(port.startswith("127.0.0.1:") for name in ("prometheus", "grafana")
               for port in services[name]["ports"])

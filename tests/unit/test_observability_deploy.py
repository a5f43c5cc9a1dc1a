"""The Grafana dashboard and Prometheus rules parse, cover the required alerts, and name only real metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from audit import observability  # noqa: F401 - registers the scrape-time gauges
from core.metrics import REGISTRY

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
METRIC = re.compile(r"\bgovrag_[a-z_]+")
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def _known() -> set[str]:
    names = set()
    for metric in REGISTRY.collect():
        names.add(metric.name)
        names.update(metric.name + suffix for suffix in SUFFIXES)
    return names


def _expressions() -> list[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "govrag.json").read_text())
    return exprs + [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_every_referenced_metric_exists() -> None:
    referenced = {name for expr in _expressions() for name in METRIC.findall(expr)}
    assert referenced and referenced <= _known(), referenced - _known()


def test_required_alerts_are_present_and_compose_references_them() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {"GovragInjectionSpike", "GovragPiiResurfacedInOutput", "GovragAuthzRecheckDrops",
            "GovragAuditWriteFailures", "GovragKillSwitchTripped"} <= names
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    mounts = " ".join(compose["services"]["prometheus"]["volumes"] + compose["services"]["grafana"]["volumes"])
    assert "deploy/prometheus/alerts.yml" in mounts and "deploy/grafana/dashboards" in mounts


def test_compose_requires_the_metrics_token_and_hands_it_to_prometheus() -> None:
    """The API's port is published: its /metrics (department names, kill-switch states) needs the token."""
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    token = compose["services"]["api"]["environment"].get("GOVRAG_METRICS_TOKEN", "")
    assert token.startswith("${GOVRAG_METRICS_TOKEN:?"), "compose must refuse to start without the token"
    assert compose["secrets"]["metrics-token"] == {"environment": "GOVRAG_METRICS_TOKEN"}
    assert "metrics-token" in compose["services"]["prometheus"]["secrets"]
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"][0]
    assert scrape["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/metrics-token"}

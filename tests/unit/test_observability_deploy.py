"""The Grafana dashboard and Prometheus rules parse, cover the required alerts, and name only real metrics."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from audit import observability  # noqa: F401 - registers the scrape-time gauges
from core.metrics import REGISTRY
from core.settings import Settings
from retrieval import onnx_embedder

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
            "GovragAuditWriteFailures", "GovragKillSwitchTripped", "GovragQueriesFailing",
            "GovragSelfGrantRefused", "GovragAuditMirrorWriteFailures"} <= names
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


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    lines = (DEPLOY.parent / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    words = [line.strip().split(None, 1) for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return [(word[0].upper(), word[1] if len(word) > 1 else "") for word in words]


def test_the_image_copies_every_file_the_package_build_names() -> None:
    """pyproject's license-files names LICENSE, which the image never copied: the installed package lacked its licence
    and setuptools warned "Pattern 'LICENSE' did not match any files" (a build error from 2027-02-18)."""
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())["project"]
    copied = {source for instruction, args in _dockerfile() if instruction == "COPY" for source in args.split()[:-1]}
    assert {"pyproject.toml", project["readme"], *project["license-files"]} <= copied, copied


def test_the_image_builds_the_onnx_model_into_the_cache_it_runs_with(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every container exported the embedding model at start, into a home folder no volume keeps."""
    instructions = _dockerfile()
    env = dict(pair.split("=", 1) for args in (a for i, a in instructions if i == "ENV") for pair in args.split())
    step = [n for n, (i, args) in enumerate(instructions) if i == "RUN" and "ensure_onnx_model()" in args]
    install = [n for n, (i, args) in enumerate(instructions) if i == "RUN" and "pip install ." in args]
    user = [n for n, (i, _) in enumerate(instructions) if i == "USER"]
    assert len(step) == 1 and install[0] < step[0] < user[0], "export after installing, as root (read-only at run)"
    monkeypatch.setenv("GOVRAG_MODEL_CACHE", env["GOVRAG_MODEL_CACHE"])
    assert onnx_embedder.onnx_path().parent == Path(env["GOVRAG_MODEL_CACHE"])
    assert callable(onnx_embedder.ensure_onnx_model)


def _compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())  # type: ignore[no-any-return]


def _default(value: str) -> str:
    """The default of a compose `${NAME:-default}` value (the value itself when it has none)."""
    match = re.fullmatch(r"\$\{[A-Z0-9_]+:-(.*)\}", value)
    return match.group(1) if match else value


def test_every_long_running_service_has_a_healthcheck() -> None:
    """The worker, Prometheus and Grafana had none: a wedged worker or a dead scraper showed as running."""
    services = _compose()["services"]
    unchecked = [name for name, service in services.items()
                 if service.get("restart") != "no" and not service.get("healthcheck", {}).get("test")]
    assert unchecked == []


def test_everything_a_service_references_is_declared() -> None:
    compose = _compose()
    for name, service in compose["services"].items():
        secrets = {s if isinstance(s, str) else s["source"] for s in service.get("secrets", [])}
        assert secrets <= set(compose.get("secrets", {})), name
        named = {v.split(":", 1)[0] for v in service.get("volumes", []) if not v.startswith(("/", ".", "$"))}
        assert named <= set(compose.get("volumes", {})), name
        assert set(service.get("networks", [])) <= set(compose.get("networks", {})), name


def test_compose_sets_only_real_settings_and_its_model_server_is_allowed(tmp_path: Path) -> None:
    """The API took no answer-backend setting; with the optional model-server its defaults must pass the allowlist."""
    compose = _compose()
    services = compose["services"]
    names = {key for service in services.values() for key in service.get("environment", {})
             if key.startswith("GOVRAG_")}
    assert {f"GOVRAG_{field.upper()}" for field in Settings.model_fields} >= names
    api = services["api"]["environment"]
    assert {"GOVRAG_ANSWER_BACKEND", "GOVRAG_LLM_BASE_URL", "GOVRAG_LLM_MODEL", "GOVRAG_LLM_ALLOWED_HOSTS"} <= set(api)
    settings = Settings(data_dir=tmp_path, answer_backend="openai", llm_base_url=_default(api["GOVRAG_LLM_BASE_URL"]),
                        llm_allowed_hosts=json.loads(_default(api["GOVRAG_LLM_ALLOWED_HOSTS"])))
    assert urlsplit(settings.llm_base_url).hostname in services  # the compose service, reachable by that name
    assert services["model-server"]["profiles"], "the model server starts only when its profile is asked for"
    assert set(services["model-server"]["networks"]) == {"backend"}  # internal: no way out to the internet

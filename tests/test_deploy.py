"""The deployment files cannot run here (no Docker engine, no cluster); what can be
checked is that they parse and only use commands, flags, env vars and probe paths
that whipcast really has."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from whipcast.gateway.settings import ENV_VARS, Settings
from whipcast.signaling.app import make_app
from whipcast.signaling.cli import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ROLES = {"signaling", "ingest", "egress"}
PROBES = {"/healthz", "/readyz"}


def check_command(args: list[str]) -> None:
    """``args`` (without the program name) parse with whipcast's own parser."""
    assert args and args[0] in ROLES, args
    substituted = [re.sub(r"\$\((\w+)\)", "x", a) for a in args]
    build_parser().parse_args(substituted)  # exits (SystemExit) on an unknown flag


def check_env(names: list[str]) -> None:
    ours = [n for n in names if n.startswith("WHIPCAST_") or n == "KAFKA_HOME"]
    unknown = set(ours) - set(ENV_VARS)
    assert not unknown, f"env vars whipcast does not read: {unknown}"


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert entrypoint == ["whipcast"]
    check_command(cmd)
    check_env(re.findall(r"^ENV (\w+)=", text, re.M))
    for source in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (DEPLOY.parent / source).exists(), source
    assert "/healthz" in text


def test_compose():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"kafka", *ROLES} <= set(services)
    assert services["kafka"]["image"].startswith("apache/kafka:")
    for role in ROLES:
        service = services[role]
        check_command(service["command"])
        check_env(list(service["environment"]))
        bootstrap = service["environment"]["WHIPCAST_KAFKA_BOOTSTRAP"]
        listeners = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        assert bootstrap in listeners


@pytest.mark.parametrize("role", sorted(ROLES))
def test_kubernetes(role):
    documents = list(yaml.safe_load_all((DEPLOY / "k8s" / "whipcast.yaml").read_text()))
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    config = {d["metadata"]["name"]: d for d in documents if d["kind"] in ("ConfigMap", "Secret")}
    check_env([k for d in config.values() for k in d.get("data", d.get("stringData", {}))])
    pod = deployments[f"whipcast-{role}"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    check_command(container["args"])
    check_env([e["name"] for e in container.get("env", []) if e["name"] != "HOST_IP"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in PROBES
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    if role != "signaling":
        assert pod["hostNetwork"] is True, "media roles need the host's UDP addresses"


def test_probe_paths_are_served():
    app = make_app(Settings(), roles=("egress",))
    routes = {r.canonical for r in app.router.resources()}
    assert routes >= PROBES

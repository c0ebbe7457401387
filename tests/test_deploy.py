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
from whipcast.signaling.app import ROLES as APP_ROLES
from whipcast.signaling.app import make_app
from whipcast.signaling.cli import build_parser

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ROLES = set(APP_ROLES)
MEDIA = {"ingest", "egress"}
"""Roles that take WebRTC sessions: they need the host's UDP addresses."""
PROBES = {"/healthz", "/readyz"}


def check_command(args: list[str]) -> None:
    """``args`` (without the program name) parse with whipcast's own parser."""
    assert args and args[0] in ROLES, args
    substituted = [re.sub(r"\$\((\w+)\)", "x", a) for a in args]
    try:
        build_parser().parse_args(substituted)
    except SystemExit:  # argparse exits on an unknown flag or a bad value
        pytest.fail(f"whipcast does not accept {args}")


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
    record = services["record"]["command"]
    volume = services["record"]["volumes"][0].split(":")[1]
    assert record[record.index("--dir") + 1] == volume


def test_unknown_flags_fail():
    """The checks above can fail: a flag whipcast lacks is caught."""
    with pytest.raises(pytest.fail.Exception, match="does not accept"):
        check_command(["hls", "--hls-window-seconds", "60"])
    with pytest.raises(pytest.fail.Exception, match="does not accept"):
        check_command(["record", "--host", "0.0.0.0"])  # --dir is required


@pytest.mark.parametrize("role", sorted(ROLES))
def test_kubernetes(role):
    documents = list(yaml.safe_load_all((DEPLOY / "k8s" / "whipcast.yaml").read_text()))
    deployments = {
        d["metadata"]["name"]: d for d in documents if d["kind"] in ("Deployment", "StatefulSet")
    }
    config = {d["metadata"]["name"]: d for d in documents if d["kind"] in ("ConfigMap", "Secret")}
    check_env([k for d in config.values() for k in d.get("data", d.get("stringData", {}))])
    pod = deployments[f"whipcast-{role}"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    check_command(container["args"])
    check_env([e["name"] for e in container.get("env", []) if e["name"] != "HOST_IP"])
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in PROBES
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    if role in MEDIA:
        assert pod["hostNetwork"] is True, "media roles need the host's UDP addresses"
    else:
        assert not pod.get("hostNetwork"), "only WebRTC needs the host's network"
    if role in ("signaling", "hls"):  # reached over HTTP through a Service
        services = [d for d in documents if d["kind"] == "Service"]
        assert any(d["spec"]["selector"]["role"] == role for d in services)
    secrets = [e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
               if "secretKeyRef" in e.get("valueFrom", {})]  # fmt: skip
    assert all(ref["key"] in ENV_VARS for ref in secrets)
    if role == "record":
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert container["args"][container["args"].index("--dir") + 1] in mounts


def test_probe_paths_are_served():
    app = make_app(Settings(), roles=("egress",))
    routes = {r.canonical for r in app.router.resources()}
    assert routes >= PROBES

"""The deploy folder: every file parses, and every captrain command it runs exists."""

from __future__ import annotations

import configparser
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from typer.main import get_command

from scheduler.cli import app

DEPLOY = ROOT / "deploy"
CLI = get_command(app)


def _check_captrain_argv(argv: list[str], where: str) -> None:
    """argv after the program name: its command must exist and accept its options."""
    assert argv, f"{where}: empty captrain command"
    cmd = CLI.commands.get(argv[0])  # type: ignore[attr-defined]
    assert cmd is not None, f"{where}: no captrain command {argv[0]!r}"
    if argv[0] == "db":
        assert argv[1] in cmd.commands, f"{where}: no captrain db {argv[1]!r}"  # type: ignore[attr-defined]
        return
    known = {opt for p in cmd.params for opt in getattr(p, "opts", [])}
    for token in argv[1:]:
        if token.startswith("-"):
            assert token.split("=")[0] in known, f"{where}: {argv[0]} has no option {token}"


def _yaml_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_compose_services_run_real_captrain_commands():
    compose = _yaml_docs(DEPLOY / "docker-compose.yml")[0]
    services = compose["services"]
    assert {"redis", "postgres", "migrate", "flower", "worker-cpu", "worker-gpu"} <= set(services)
    assert "--requirepass" in services["redis"]["command"]
    assert "--appendonly" in services["redis"]["command"]
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "CAPTRAIN_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    for name, svc in services.items():
        if str(svc.get("image", "")).startswith("captrain"):
            _check_captrain_argv(svc["command"], f"compose {name}")


def test_kubernetes_manifests_parse_and_run_real_commands():
    kinds = []
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in _yaml_docs(path):
            kinds.append(doc["kind"])
            spec = doc.get("spec", {})
            pod = spec.get("template", {}).get("spec", {})
            for c in pod.get("containers", []):
                _check_captrain_argv(c["args"], f"{path.name}:{c['name']}")
                refs = [e["secretRef"]["name"] for e in c.get("envFrom", [])]
                assert refs == ["captrain"], f"{path.name}: settings must come from the Secret"
            if doc["metadata"]["name"] == "captrain-worker-gpu":
                limits = pod["containers"][0]["resources"]["limits"]
                assert limits["nvidia.com/gpu"] == 1
    assert {"Secret", "Job", "Deployment", "Service"} <= set(kinds)


@pytest.mark.parametrize("unit", sorted((DEPLOY / "systemd").glob("*.service")),
                         ids=lambda p: p.name)
def test_systemd_units_parse_and_exec_real_commands(unit):
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read_string(unit.read_text())
    exec_start = shlex.split(parser["Service"]["ExecStart"])
    assert exec_start[0].endswith("/captrain")
    _check_captrain_argv(exec_start[1:], unit.name)
    assert parser["Service"]["EnvironmentFile"] == "/etc/captrain/env"


def test_dockerfile_builds_cpu_and_cuda_stages_of_this_project():
    text = (DEPLOY / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.M)
    assert stages == ["wheels", "cpu", "cuda"]
    for folder in re.findall(r"^COPY (shared|scheduler|workers) ", text, flags=re.M):
        assert (ROOT / folder).is_dir()
    for cmd in re.findall(r'^CMD (\[.*\])', text, flags=re.M):
        _check_captrain_argv(yaml.safe_load(cmd), "Dockerfile CMD")
    assert 'ENTRYPOINT ["captrain"]' in text


def test_the_serve_service_binds_with_its_key_and_probes_readiness_and_liveness():
    from scheduler.cli.serve import is_loopback

    serve = _yaml_docs(DEPLOY / "docker-compose.yml")[0]["services"]["serve"]
    argv = serve["command"]
    assert argv[0] == "serve" and not is_loopback(argv[argv.index("--host") + 1])
    assert "CAPTRAIN_SERVE_API_KEY" in serve["environment"]  # beyond loopback: required
    probe = " ".join(serve["healthcheck"]["test"])
    assert "/readyz" in probe and "CAPTRAIN_SERVE_API_KEY" in probe

    docs = {d["kind"]: d for d in _yaml_docs(DEPLOY / "k8s" / "serve.yaml")}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["args"][0] == "serve" and not is_loopback(c["args"][c["args"].index("--host") + 1])
    ready = " ".join(c["readinessProbe"]["exec"]["command"])
    assert "/readyz" in ready and "CAPTRAIN_SERVE_API_KEY" in ready
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port = c["ports"][0]
    assert port["containerPort"] == int(c["args"][c["args"].index("--port") + 1])
    service = docs["Service"]["spec"]
    assert service["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]
    assert service["ports"][0]["targetPort"] == port["name"]
    secret = _yaml_docs(DEPLOY / "k8s" / "secret.yaml")[0]["stringData"]
    assert len(secret["CAPTRAIN_SERVE_API_KEY"]) >= 16  # the settings' minimum
    # The image that runs it has the serve extra.
    cpu = (DEPLOY / "Dockerfile").read_text().split(" AS cpu")[1].split(" AS cuda")[0]
    assert "[worker,serve]" in cpu

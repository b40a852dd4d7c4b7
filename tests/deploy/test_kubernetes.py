"""deploy/kubernetes against the Kubernetes OpenAPI schemas (kubernetes-validate, strict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from agent.settings import AgentSettings
from tests.deploy.commands import DEPLOY, parse

MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))


def documents() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def containers(kind: str, name: str) -> list[dict[str, Any]]:
    return find(kind, name)["spec"]["template"]["spec"]["containers"]


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_manifest_is_valid_for_kubernetes(doc: dict[str, Any]) -> None:
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")


def test_validation_rejects_a_misspelt_field() -> None:
    daemonset = find("DaemonSet", "tailguard-agent")
    daemonset["spec"]["template"]["spec"]["hostNetwrk"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, kubernetes_validate.latest_version(), strict=True)


def test_agent_daemonset_gets_gpus_host_network_and_host_paths(tmp_path: Path) -> None:
    pod = find("DaemonSet", "tailguard-agent")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    (agent,) = pod["containers"]
    assert agent["resources"]["limits"]["nvidia.com/gpu"] >= 1
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    assert host_paths["sys"] == "/sys" and mounts["sys"]["readOnly"] is True
    assert host_paths["infiniband"] == mounts["infiniband"]["mountPath"] == "/dev/infiniband"

    config = tmp_path / "agent.toml"
    config.write_text(find("ConfigMap", "tailguard-agent")["data"]["agent.toml"])
    settings = AgentSettings.load(config, env={})
    assert host_paths["state"] == mounts["state"]["mountPath"] == str(settings.state_dir)
    assert mounts["sys"]["mountPath"] == str(settings.sysfs_root)
    assert settings.metrics_port == 9810
    assert settings.metrics_bind_address == "0.0.0.0", "Prometheus scrapes it from outside"
    # Every gateway of a deployment reaches its workers on this node, at the node's address.
    assert settings.worker_host == "0.0.0.0"
    env = {e["name"]: e.get("valueFrom", {}) for e in agent["env"]}
    assert env["TAILGUARD_AGENT_WORKER_ADVERTISE"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    runs = [
        i["value"]
        for i in DockerfileParser(str(DEPLOY / "Dockerfile")).structure
        if i["instruction"] == "RUN"
    ]
    accounts = {
        command.split()[-1]
        for run in runs
        for command in run.split("&&")
        if command.split()[:1] == ["useradd"]
    }
    assert settings.worker_user in accounts, "the image creates the account workers run as"
    assert settings.gateway_user in accounts, "and the gateway's, apart from them"


def test_agent_runs_its_console_script_with_the_mounted_config_and_bootstrap_secret() -> None:
    (agent,) = containers("DaemonSet", "tailguard-agent")
    args = parse(agent["command"])
    config_mount = next(m for m in agent["volumeMounts"] if m["name"] == "config")
    assert args["command"] == "run"
    assert args["config"].parent == Path(config_mount["mountPath"])
    secret = find("Secret", agent["envFrom"][0]["secretRef"]["name"])
    assert AgentSettings.load(None, env=secret["stringData"]).bootstrap_token


def test_control_plane_workloads_run_the_projects_commands() -> None:
    (migrate,) = find("Job", "tailguard-migrate")["spec"]["template"]["spec"]["containers"]
    assert parse(migrate["command"])["command"] == "migrate"
    (web,) = containers("Deployment", "tailguard-web")
    assert parse(web["command"])["app"] == "controlplane.asgi:application"
    # its uvicorn workers share /metrics counters on a volume of the pod's own
    (shared,) = [e["value"] for e in web["env"] if e["name"] == "PROMETHEUS_MULTIPROC_DIR"]
    mount = next(m for m in web["volumeMounts"] if m["mountPath"] == shared)
    pod = find("Deployment", "tailguard-web")["spec"]["template"]["spec"]
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mount["name"])
    (worker,) = containers("Deployment", "tailguard-worker")
    assert parse(worker["command"])["command"] == "worker" and "-B" not in worker["command"]
    (beat,) = containers("Deployment", "tailguard-beat")
    assert parse(beat["command"])["command"] == "beat"


def test_beat_is_a_single_replica_that_is_never_doubled() -> None:
    beat = find("Deployment", "tailguard-beat")["spec"]
    assert beat["replicas"] == 1 and beat["strategy"]["type"] == "Recreate"


def test_web_service_selects_the_web_pods() -> None:
    service = find("Service", "tailguard-web")["spec"]
    labels = find("Deployment", "tailguard-web")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= labels.items()

"""deploy/systemd: units that systemd itself accepts, running the project's own commands."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.settings import AgentSettings
from tests.deploy.commands import DEPLOY, parse

UNITS = DEPLOY / "systemd"
CONTROL_PLANE = ("tailguard-web", "tailguard-worker", "tailguard-beat")
HARDENING = ("NoNewPrivileges", "ProtectSystem", "StateDirectory")


def read_unit(name: str) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string((UNITS / f"{name}.service").read_text())
    return unit


def exec_start(name: str) -> list[str]:
    return shlex.split(read_unit(name)["Service"]["ExecStart"])


def test_every_unit_is_one_of_the_four() -> None:
    assert sorted(p.stem for p in UNITS.glob("*.service")) == sorted(
        [*CONTROL_PLANE, "tailguard-agent"]
    )


@pytest.mark.parametrize("name", [*CONTROL_PLANE, "tailguard-agent"])
def test_unit_has_its_sections_and_hardening(name: str) -> None:
    unit = read_unit(name)
    assert {"Unit", "Service", "Install"} <= set(unit.sections())
    assert unit["Unit"]["Description"]
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    service = unit["Service"]
    assert service["Restart"] == "always"
    for key in HARDENING:
        assert service.get(key), f"{name} lacks {key}="
    assert service["NoNewPrivileges"] == "yes"


@pytest.mark.parametrize("name", CONTROL_PLANE)
def test_control_plane_units_run_unprivileged_from_the_environment_file(name: str) -> None:
    service = read_unit(name)["Service"]
    assert service["User"] == service["Group"] == "tailguard"
    assert service["EnvironmentFile"] == "/etc/tailguard/tailguard.env"
    assert service["ProtectSystem"] == "strict"
    assert service["StateDirectory"] == "tailguard"


def test_web_runs_several_uvicorn_workers_of_the_asgi_application() -> None:
    args = parse(exec_start("tailguard-web"))
    assert args["program"] == "uvicorn"
    assert args["app"] == "controlplane.asgi:application"
    assert args["workers"] > 1
    # they share /metrics counters in a directory emptied at each start
    service = read_unit("tailguard-web")["Service"]
    assert service["RuntimeDirectory"] == "tailguard-web"
    assert service["Environment"] == "PROMETHEUS_MULTIPROC_DIR=/run/tailguard-web"


def test_worker_runs_without_embedded_beat_and_beat_runs_alone() -> None:
    worker = exec_start("tailguard-worker")
    assert parse(worker)["command"] == "worker"
    assert "-B" not in worker and "--beat" not in worker
    beat = parse(exec_start("tailguard-beat"))
    assert beat["command"] == "beat"
    assert beat["schedule"].startswith("/var/lib/tailguard/"), "the schedule lives in the state dir"


def test_agent_unit_runs_the_console_script_with_a_valid_settings_file() -> None:
    args = parse(exec_start("tailguard-agent"))
    assert args["program"] == "tailguard-agent" and args["command"] == "run"
    assert args["config"] == Path("/etc/tailguard/agent.toml")
    settings = AgentSettings.load(UNITS / "agent.toml", env={})
    assert settings.state_dir == Path("/var/lib/tailguard-agent")
    assert read_unit("tailguard-agent")["Service"]["StateDirectory"] == "tailguard-agent"


def test_agent_env_file_names_only_agent_settings() -> None:
    values = dict(
        line.split("=", 1)
        for line in (UNITS / "agent.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    settings = AgentSettings.load(None, env=values)
    assert settings.bootstrap_token == values["TAILGUARD_AGENT_BOOTSTRAP_TOKEN"]


def test_systemd_analyze_accepts_every_unit(tmp_path: Path) -> None:
    """systemd's own parser: unknown keys and bad values are reported, not ignored.

    It checks in a scratch root where the units' programs exist as stubs (the commands
    themselves are checked above) and systemd's own units provide the standard targets.
    """
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: `./tailguard test` installs Debian's systemd"
    shutil.copytree("/usr/lib/systemd/system", tmp_path / "usr/lib/systemd/system", symlinks=True)
    target = tmp_path / "etc/systemd/system"
    target.mkdir(parents=True)
    units = sorted(UNITS.glob("*.service"))
    for unit in units:
        shutil.copy(unit, target)
        program = tmp_path / exec_start(unit.stem)[0].lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    done = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", f"--root={tmp_path}"]
        + [f"/etc/systemd/system/{unit.name}" for unit in units],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "tailguard" not in done.stdout + done.stderr, (
        done.stdout + done.stderr
    )


def test_agent_workers_run_as_the_account_sysusers_creates() -> None:
    """agent.toml names the accounts that tailguard-agent.sysusers.conf creates (two: the
    workers' and the gateway's), and the state directory lets them through to their files."""
    lines = (UNITS / "tailguard-agent.sysusers.conf").read_text().splitlines()
    created = {
        shlex.split(line)[1]
        for line in lines
        if line.strip() and not line.startswith("#") and line.split()[0] == "u"
    }
    settings = AgentSettings.load(UNITS / "agent.toml", env={})
    assert settings.worker_user in created and settings.gateway_user in created
    assert settings.worker_user != settings.gateway_user
    assert read_unit("tailguard-agent")["Service"]["StateDirectoryMode"] == "0711"

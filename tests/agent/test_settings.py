"""Agent settings: file, then environment, then flags; bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.settings import AgentSettings


def test_file_then_environment(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text(
        'control_plane_url = "https://cp.example"\ninventory_interval_s = 60\nstate_dir = "/srv/agent"\n'
    )
    settings = AgentSettings.load(config, env={"TAILGUARD_AGENT_INVENTORY_INTERVAL_S": "30"})
    assert settings.control_plane_url == "https://cp.example"
    assert settings.state_dir == Path("/srv/agent")
    assert settings.inventory_interval_s == 30.0


def test_unknown_and_malformed_settings_are_named(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('colour = "blue"\n')
    with pytest.raises(ValueError, match="unknown agent settings: colour"):
        AgentSettings.load(config, env={})
    with pytest.raises(ValueError, match="resync_interval_s must be a number"):
        AgentSettings.load(None, env={"TAILGUARD_AGENT_RESYNC_INTERVAL_S": "soon"})


def test_flags_override_environment_and_file(tmp_path: Path) -> None:
    config = tmp_path / "agent.toml"
    config.write_text('hostname = "from-file"\nspdk_rpc_socket = "/var/tmp/spdk.sock"\n')
    env = {"TAILGUARD_AGENT_HOSTNAME": "from-env", "TAILGUARD_AGENT_SPDK_RPC_SOCKET": ""}
    settings = AgentSettings.load(config, env=env, hostname="from-flag")
    assert settings.hostname == "from-flag"
    assert settings.spdk_rpc_socket is None, "an empty variable unsets what the file set"
    assert AgentSettings.load(config, env=env).hostname == "from-env"
    assert AgentSettings.load(config, env={}).hostname == "from-file"


def test_settings_are_frozen_and_keep_the_token_out_of_repr() -> None:
    settings = AgentSettings.load(None, env={"TAILGUARD_AGENT_BOOTSTRAP_TOKEN": "tgb_secret"})
    assert settings.bootstrap_token == "tgb_secret"
    assert "tgb_secret" not in repr(settings)
    with pytest.raises(ValidationError):
        settings.metrics_port = 0


def test_out_of_range_values_and_a_missing_file_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="setting telemetry_interval_s: .*greater than 0"):
        AgentSettings.load(None, env={"TAILGUARD_AGENT_TELEMETRY_INTERVAL_S": "0"})
    with pytest.raises(ValueError, match="metrics_port must be an integer, not '9810.5'"):
        AgentSettings.load(None, env={"TAILGUARD_AGENT_METRICS_PORT": "9810.5"})
    with pytest.raises(FileNotFoundError, match="missing.toml"):
        AgentSettings.load(tmp_path / "missing.toml", env={})

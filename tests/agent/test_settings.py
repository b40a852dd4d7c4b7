"""Agent settings: file, then environment; bad values named."""

from __future__ import annotations

from pathlib import Path

import pytest

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

"""`tailguard demo --port P`: every listener and URL follows P, and a port that is taken is
refused before anything is migrated, naming it and the flag that moves it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controlplane import cli, demo, tour
from controlplane.processes import DemoPorts, url


def free_base() -> int:
    """A --port whose three ports are free now."""
    for _ in range(20):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        try:
            DemoPorts.following(port).check_free("127.0.0.1")
        except SystemExit:
            continue
        return port
    raise AssertionError("no three consecutive free ports found")


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The arguments `run_demo` would have started with (it is not run), and PUBLIC_URL then."""
    calls: list[dict[str, Any]] = []

    def run_demo(**kwargs: Any) -> int:
        calls.append({**kwargs, "PUBLIC_URL": os.environ.get("PUBLIC_URL")})
        return 0

    monkeypatch.setattr(demo, "run_demo", run_demo)
    monkeypatch.setattr(cli, "_setup_django", lambda: None)  # already set up for the tests
    monkeypatch.setenv("PUBLIC_URL", "unset by the test")
    monkeypatch.delenv("PUBLIC_URL")  # restored to what it was when the test ends
    return calls


def test_every_listener_and_public_url_follow_the_port(runs: list[dict[str, Any]]) -> None:
    base = free_base()
    assert cli.main(["demo", "--port", str(base), "--no-tour"]) == 0
    [call] = runs
    assert call["ports"] == DemoPorts(
        control_plane=base, webhook_receiver=base + 1, agent_metrics=base + 2
    )
    assert call["PUBLIC_URL"] == f"http://127.0.0.1:{base}"

    receiver = tour.WebhookReceiver(lambda status, alert: None, port=call["ports"].webhook_receiver)
    try:
        assert receiver.url == f"http://127.0.0.1:{base + 1}/alerts"
    finally:
        receiver.close()


def test_a_public_url_set_by_the_operator_is_kept(
    runs: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUBLIC_URL", "https://demo.example")
    assert cli.main(["demo", "--port", str(free_base())]) == 0
    assert runs[0]["PUBLIC_URL"] == "https://demo.example"


@pytest.mark.parametrize(
    ("offset", "what"),
    [
        (0, "the control plane (--port)"),
        (1, "the tour's webhook receiver (--port + 1)"),
        (2, "the node agent's /metrics (--port + 2)"),
    ],
)
def test_a_busy_port_is_refused_before_anything_starts(
    runs: list[dict[str, Any]], offset: int, what: str
) -> None:
    base = free_base()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", base + offset))
        holder.listen()
        with pytest.raises(SystemExit) as refused:
            cli.main(["demo", "--port", str(base)])
    message = str(refused.value.code)
    assert message.startswith(f"Cannot listen on 127.0.0.1 port {base + offset} ("), message
    assert f"which the demo needs for {what}" in message
    assert "move the demo with --port" in message
    assert runs == []  # nothing migrated, seeded or started
    assert "PUBLIC_URL" not in os.environ


def test_ports_beyond_the_last_three_are_refused() -> None:
    with pytest.raises(SystemExit, match="must be 1 to 65533"):
        DemoPorts.following(65534)


def test_urls_reach_the_listener_from_this_machine() -> None:
    assert url("127.0.0.1", 8100) == "http://127.0.0.1:8100"
    assert url("0.0.0.0", 8100) == "http://127.0.0.1:8100"
    assert url("::", 8100) == "http://[::1]:8100"
    assert url("::1", 8100) == "http://[::1]:8100"
    assert url("demo.example", 8100) == "http://demo.example:8100"


def test_the_control_planes_own_settings_take_the_port_in_the_demo_process(
    tmp_path: Path,
) -> None:
    """Settings load once per process: the demo must set PUBLIC_URL before Django loads them."""
    script = (
        "import sys, types\n"
        "from controlplane import cli\n"
        "def run_demo(**kwargs):\n"
        "    from django.conf import settings\n"
        "    print(settings.PUBLIC_URL)\n"
        "    return 0\n"
        "sys.modules['controlplane.demo'] = types.SimpleNamespace(run_demo=run_demo)\n"
        "sys.exit(cli.main(sys.argv[1:]))\n"
    )
    base = free_base()
    env = {k: v for k, v in os.environ.items() if k != "PUBLIC_URL"}
    env["TAILGUARD_DATA_DIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", script, "demo", "--port", str(base)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"http://127.0.0.1:{base}"

"""Command lines of the control plane's own processes and of the demo's SPDK ones, shared by
the demo, tests and benches, and the ports the demo gives them."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = "127.0.0.1"


def url(host: str, port: int) -> str:
    """How this machine reaches a listener on `host`: a wildcard address by loopback, an IPv6
    address in brackets."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else LOOPBACK)
    return f"http://[{address}]:{port}" if address.version == 6 else f"http://{address}:{port}"


@dataclass(frozen=True)
class DemoPorts:
    """Every port `tailguard demo` listens on, all following `--port`: one flag moves the
    whole demo, so two demos on one machine differ only in it."""

    control_plane: int
    webhook_receiver: int
    agent_metrics: int

    @classmethod
    def following(cls, port: int) -> DemoPorts:
        if not 1 <= port <= 65535 - 2:
            raise SystemExit(
                f"--port {port} is out of range: the demo listens on --port, --port + 1 and "
                "--port + 2, so it must be 1 to 65533."
            )
        return cls(control_plane=port, webhook_receiver=port + 1, agent_metrics=port + 2)

    def check_free(self, host: str) -> None:
        """Refuse a port that cannot be listened on before anything is migrated or started,
        naming it and the flag that moves it."""
        for what, address, port, offset in (
            ("the control plane", host, self.control_plane, ""),
            ("the tour's webhook receiver", LOOPBACK, self.webhook_receiver, " + 1"),
            ("the node agent's /metrics", LOOPBACK, self.agent_metrics, " + 2"),
        ):
            try:
                _try_listen(address, port)
            except OSError as exc:
                raise SystemExit(
                    f"Cannot listen on {address} port {port} ({exc.strerror or exc}), which the "
                    f"demo needs for {what} (--port{offset}). Stop what holds it, or move the "
                    "demo with --port: it listens on --port, --port + 1 and --port + 2."
                ) from None


def _try_listen(host: str, port: int) -> None:
    """Bind and listen as the servers do (SO_REUSEADDR: a closed connection's TIME_WAIT
    does not count, another listener does)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen()


def web(host: str, port: int, workers: int = 1) -> list[str]:
    """The ASGI server (HTTP API, console, agent endpoints)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "controlplane.asgi:application",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
        "--log-level",
        "warning",
    ]


def celery_worker(beat_schedule: Path) -> list[str]:
    """The Celery worker with beat embedded (periodic upkeep such as unreachable nodes)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "controlplane",
        "worker",
        "-B",
        "--pool",
        "solo",
        "--loglevel",
        "warning",
        "-s",
        str(beat_schedule),
    ]


def agent(control_plane: str, bootstrap_token: str, state_dir: Path, hostname: str) -> list[str]:
    """A node agent for this machine."""
    return [
        sys.executable,
        "-m",
        "agent",
        "run",
        "--control-plane",
        control_plane,
        "--bootstrap-token",
        bootstrap_token,
        "--state-dir",
        str(state_dir),
        "--hostname",
        hostname,
    ]


def simulated_nodes(
    control_plane: str, bootstrap_token: str, state_dir: Path, count: int
) -> list[str]:
    """`count` lightweight simulated nodes in one process (scale without hardware)."""
    return [
        sys.executable,
        "-m",
        "agent",
        "--log-level",
        "WARNING",
        "simulate",
        "--count",
        str(count),
        "--control-plane",
        control_plane,
        "--bootstrap-token",
        bootstrap_token,
        "--state-dir",
        str(state_dir),
    ]


def spdk_target(binary: Path, rpc_socket: Path) -> list[str]:
    """spdk_tgt without hugepages, PCI devices or root-owned lock and trace files: 1 GiB of
    DPDK memory (what its iobuf and iSCSI pools need), one reactor on core 0."""
    return [
        str(binary),
        "--no-huge",
        "-s",
        "1024",
        "-u",
        "-m",
        "0x1",
        "--disable-cpumask-locks",
        "--num-trace-entries",
        "0",
        "-r",
        str(rpc_socket),
    ]


def nvme_reader(binary: Path, address: str, core: int) -> list[str]:
    """Random 4 KiB reads, one at a time, for an hour (then it is started again): the
    volume's QoS sets the pace. On its own core, so its polling never delays the target's."""
    return [
        str(binary),
        "--no-huge",
        "-s",
        "64",
        "-c",
        hex(1 << core),
        "-q",
        "1",
        "-o",
        "4096",
        "-w",
        "randread",
        "-t",
        "3600",
        "-r",
        address,
    ]


def dpdk_runtime_dir(pid: int) -> Path:
    """Where DPDK keeps an SPDK process's runtime files; it leaves the folder behind."""
    base = "/var/run" if os.getuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    return Path(base) / "dpdk" / f"spdk_pid{pid}"

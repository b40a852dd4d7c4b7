"""RDMA collector: sysfs fallback and the pyverbs path, on the same fake hardware."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from agent.discovery.base import Collector
from agent.discovery.rdma import RdmaCollector, load_pyverbs, parse_rate, parse_state
from agent.protocol import NicFacts
from tests.agent.fakes import RDMA_PORTS, FakeVerbs, rdma_tree

EXPECTED = [
    NicFacts(
        device="mlx5_0", port=1, state="active", speed_gbps=200.0, width="4X",
        link_layer="InfiniBand", netdev="ibp23s0f1", pci_bus_id="0000:17:00.1", numa_node=0,
        pci_root="0000:14:01.0",
        gid="fe80:0000:0000:0000:a088:c203:0045:6a2c",
    ),
    NicFacts(
        device="mlx5_1", port=1, state="active", speed_gbps=100.0, width="4X",
        link_layer="Ethernet", netdev="ens1f0np0", pci_bus_id="0000:31:00.0", numa_node=None,
        pci_root="0000:30:02.0",
        gid="fe80:0000:0000:0000:0e42:a1ff:fe2b:3c4d",
    ),
    NicFacts(
        device="mlx5_2", port=1, state="active", speed_gbps=400.0, width="4X",
        link_layer="InfiniBand", netdev="ibp75s0", pci_bus_id="0000:4b:00.0", numa_node=1,
        pci_root="0000:4a:01.0",
        gid="fe80:0000:0000:0000:a088:c203:0045:7b10",
    ),
    NicFacts(
        device="mlx5_2", port=2, state="down", speed_gbps=2.5, width="1X",
        link_layer="InfiniBand", netdev="ibp75s0d1", pci_bus_id="0000:4b:00.0", numa_node=1,
        pci_root="0000:4a:01.0",
        gid=None,
    ),
    NicFacts(
        device="mlx5_10", port=1, state="init", speed_gbps=40.0, width="4X",
        link_layer="InfiniBand", netdev=None, pci_bus_id="0000:9a:00.0", numa_node=0, gid=None,
        pci_root="0000:97:01.0",
    ),
    NicFacts(
        device="rxe0", port=1, state="active", speed_gbps=10.0, width="1X",
        link_layer="Ethernet", netdev=None, pci_bus_id=None, pci_root=None, numa_node=None,
        gid="fe80:0000:0000:0000:5054:00ff:fe12:3456",
    ),
]  # fmt: skip


def test_ports_from_sysfs(tmp_path: Path) -> None:
    rdma_tree(tmp_path)
    collector: Collector[list[NicFacts]] = RdmaCollector(None, tmp_path)
    assert collector.name == "rdma"
    assert collector.collect() == EXPECTED


def test_ports_from_pyverbs_match_sysfs(tmp_path: Path) -> None:
    rdma_tree(tmp_path)
    verbs = FakeVerbs(RDMA_PORTS)
    assert RdmaCollector(verbs, tmp_path).collect() == EXPECTED
    assert sorted(verbs.closed) == sorted({p.device for p in RDMA_PORTS}), "every context closed"


def test_no_rdma_hardware_is_zero_ports(tmp_path: Path) -> None:
    assert RdmaCollector(None, tmp_path).collect() == []
    assert RdmaCollector(FakeVerbs([]), tmp_path).collect() == []


def test_this_machine_without_rdma_does_not_fail() -> None:
    nics = RdmaCollector(load_pyverbs()).collect()
    if not Path("/sys/class/infiniband").is_dir():
        assert nics == []


def test_pyverbs_loads_only_when_installed() -> None:
    installed = importlib.util.find_spec("pyverbs") is not None
    assert (load_pyverbs() is not None) == installed


@pytest.mark.parametrize(
    ("text", "speed", "width"),
    [
        ("2.5 Gb/sec (1X SDR)", 2.5, "1X"),
        ("10 Gb/sec (4X SDR)", 10.0, "4X"),
        ("40 Gb/sec (4X FDR10)", 40.0, "4X"),
        ("56 Gb/sec (4X FDR)", 56.0, "4X"),
        ("25 Gb/sec (1X EDR)", 25.0, "1X"),
        ("100 Gb/sec (4X EDR)", 100.0, "4X"),
        ("200 Gb/sec (2X NDR)", 200.0, "2X"),
        ("800 Gb/sec (4X XDR)", 800.0, "4X"),
        ("168 Gb/sec (12X FDR)", 168.0, "12X"),
        ("20 Gb/sec (4X)", 20.0, "4X"),
    ],
)
def test_rate_file_parsing(text: str, speed: float, width: str) -> None:
    assert parse_rate(text) == (speed, width)


@pytest.mark.parametrize("text", ["", "fast", "100 Gbps (4X EDR)", "100 Gb/sec"])
def test_unparseable_rate_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)


@pytest.mark.parametrize(
    ("text", "state"),
    [("4: ACTIVE", "active"), ("1: DOWN", "down"), ("2: INIT", "init"), ("3: ARMED", "armed"),
     ("5: ACTIVE_DEFER", "active_defer"), ("0: NOP", "nop")],
)  # fmt: skip
def test_state_file_parsing(text: str, state: str) -> None:
    assert parse_state(text) == state


def test_unknown_state_is_an_error() -> None:
    with pytest.raises(ValueError, match="state"):
        parse_state("7: SLEEPY")

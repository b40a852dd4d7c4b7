"""Host and NUMA collectors on fake /proc and /sys trees and on this machine."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from agent.discovery.base import Collector
from agent.discovery.host import HostCollector, NumaCollector
from agent.protocol import HostFacts, NumaNodeFacts
from tests.agent.fakes import host_tree, write


def test_host_facts_from_fake_tree(tmp_path: Path) -> None:
    roots = host_tree(tmp_path)
    collector: Collector[HostFacts] = HostCollector(roots.sys, roots.proc, roots.os_release)
    assert collector.name == "host"
    assert collector.collect() == HostFacts(
        hostname="gpu-node-01",
        kernel="6.8.0-45-generic",
        os="Ubuntu 24.04.1 LTS",
        cpu_model="AMD EPYC 9454 48-Core Processor",
        cpu_count=192,
        memory_bytes=1584711680 * 1024,
    )


def test_numa_nodes_from_fake_tree_in_numeric_order(tmp_path: Path) -> None:
    nodes = {n: (f"{n * 8}-{n * 8 + 7}", 1000 + n) for n in (0, 1, 2, 10)}
    roots = host_tree(tmp_path, numa=nodes)
    collector: Collector[list[NumaNodeFacts]] = NumaCollector(roots.sys, roots.proc)
    assert collector.name == "numa"
    assert collector.collect() == [
        NumaNodeFacts(index=n, cpulist=f"{n * 8}-{n * 8 + 7}", memory_total_bytes=(1000 + n) * 1024)
        for n in (0, 1, 2, 10)
    ]


def test_memory_only_numa_node_has_empty_cpulist(tmp_path: Path) -> None:
    roots = host_tree(tmp_path, numa={0: ("0-191", 792355840), 1: ("", 268435456)})
    assert NumaCollector(roots.sys, roots.proc).collect()[1] == NumaNodeFacts(
        index=1, cpulist="", memory_total_bytes=268435456 * 1024
    )


def test_machine_without_numa_dirs_reports_one_node_with_everything(tmp_path: Path) -> None:
    roots = host_tree(tmp_path, numa={})
    assert NumaCollector(roots.sys, roots.proc).collect() == [
        NumaNodeFacts(index=0, cpulist="0-191", memory_total_bytes=1584711680 * 1024)
    ]


def test_cpuinfo_without_model_name_gives_empty_model(tmp_path: Path) -> None:
    roots = host_tree(tmp_path)
    write(roots.proc, "cpuinfo", "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n\n")
    assert HostCollector(roots.sys, roots.proc, roots.os_release).collect().cpu_model == ""


def test_os_falls_back_to_name_then_linux(tmp_path: Path) -> None:
    roots = host_tree(tmp_path)
    write(roots.os_release.parent, "os-release", 'NAME="Fedora Linux"\nID=fedora\n')
    assert HostCollector(roots.sys, roots.proc, roots.os_release).collect().os == "Fedora Linux"
    missing = tmp_path / "no-such-os-release"
    assert HostCollector(roots.sys, roots.proc, missing).collect().os == "Linux"


def test_this_machine_has_host_facts() -> None:
    facts = HostCollector().collect()
    assert facts.hostname == socket.gethostname()
    assert facts.kernel == os.uname().release
    assert facts.cpu_count == os.cpu_count()
    assert facts.memory_bytes > 0
    assert facts.os


def test_this_machine_has_at_least_one_numa_node() -> None:
    nodes = NumaCollector().collect()
    assert nodes, "every machine has NUMA node 0"
    assert [n.index for n in nodes] == sorted(n.index for n in nodes)
    assert all(n.memory_total_bytes > 0 for n in nodes if n.cpulist)

"""The emulator against spdk_tgt, and engine paths only the emulator can drive.

The protocol tests ask for `target`: they run against a spdk_tgt when SPDK_TGT_BIN is set
(and against the emulator otherwise), so every answer they check is one the real target
gives; the emulator must answer the same. The tests at the end need what a CI machine's
spdk_tgt cannot have, a PCIe NVMe drive or I/O injected at will, and always use the
emulator.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from spdk.rpc.client import JSONRPCClient
from spdk.rpc.cmd_parser import remove_null
from spdk.spdk_rpc import create_parser, suppress_cli_prints

from dataplane.storage.engine import (
    Device,
    ExportSpec,
    PoolSpec,
    StorageSpec,
    VolumeSpec,
)
from dataplane.storage.spdk import SpdkEngine

from .conftest import Target, unused_port
from .spdk_emulator import NESTED, PARAMS, SpdkEmulator

MIB = 1 << 20
HOST = "nqn.2014-08.org.nvmexpress:uuid:0a0a0a0a-0000-4000-8000-00000000000a"


# ---- the method/parameter table cannot drift from the spdk package ------------------


class _Recorder:
    """Stands in for JSONRPCClient under spdk's CLI functions and records the request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def __getattr__(self, method: str) -> Callable[..., None]:
        if method.startswith("_"):
            raise AttributeError(method)
        return lambda **params: self.requests.append((method, remove_null(params)))

    def call(self, method: str, params: dict[str, Any] | None = None) -> None:
        self.requests.append((method, params or {}))


def _sample(action: argparse.Action) -> Any:
    """A value for every CLI option so the CLI function sends every parameter it knows."""
    if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):
        return True
    if action.choices:
        return list(action.choices)[0]
    if action.type in (int, float):
        return action.type(1)
    if action.type in (None, str):
        return "x"
    return action.type("all")  # comma-split lists


def client_request(
    cli: tuple[argparse.Namespace, dict[str, argparse.ArgumentParser]], method: str
) -> tuple[str, dict[str, Any]]:
    """The request spdk's rpc.py sends for `method` with every option given."""
    global_defaults, subparsers = cli
    subparser = subparsers[method]
    values = {
        a.dest: _sample(a) for a in subparser._actions if not isinstance(a, argparse._HelpAction)
    }
    args = argparse.Namespace(
        **{**vars(global_defaults), **values, "func": subparser.get_default("func")}
    )
    args.client = recorder = _Recorder()
    args.func(args)
    (request,) = recorder.requests
    return request


@pytest.fixture(scope="module")
def spdk_cli() -> tuple[argparse.Namespace, dict[str, argparse.ArgumentParser]]:
    suppress_cli_prints()
    parser, subparsers = create_parser()
    return parser.parse_args([]), dict(subparsers.choices)


def test_emulator_accepts_exactly_what_the_spdk_client_sends(
    spdk_cli: tuple[argparse.Namespace, dict[str, argparse.ArgumentParser]],
) -> None:
    unknown = sorted(set(PARAMS) - set(spdk_cli[1]))
    assert not unknown, f"methods the spdk package does not define: {unknown}"
    for method, allowed in PARAMS.items():
        name, params = client_request(spdk_cli, method)
        assert name == method
        assert set(params) == allowed, f"{method}: update PARAMS to {sorted(params)}"
        for key, value in params.items():
            if isinstance(value, dict):
                assert NESTED.get((method, key)) == set(value), (
                    f"{method}.{key}: update NESTED to {sorted(value)}"
                )
    assert {m for m, _ in NESTED} <= set(PARAMS)


def test_engine_uses_only_methods_the_emulator_knows() -> None:
    from dataplane.storage.spdk import NVMF_METHODS, REQUIRED_METHODS

    assert REQUIRED_METHODS | NVMF_METHODS <= set(PARAMS)


# ---- answers like spdk_tgt v26.05 ------------------------------------------------


@pytest.fixture
def raw(target: Target) -> Iterator[Callable[..., dict[str, Any]]]:
    with JSONRPCClient(str(target.socket)) as client:

        def request(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
            client.send(method, params)
            response: dict[str, Any] = client.recv()
            return response

        yield request


def error(response: dict[str, Any]) -> tuple[int, str]:
    assert "error" in response, f"expected an error, got {response}"
    return response["error"]["code"], response["error"]["message"]


DECODE_FAILED = (-32603, "spdk_json_decode_object failed")
INVALID = (-32602, "Invalid parameters")


def test_unknown_method_and_params_are_rejected(raw: Callable[..., dict[str, Any]]) -> None:
    assert error(raw("bdev_make_coffee"))[0] == -32601
    assert error(raw("bdev_get_bdevs", {"colour": "blue"})) == DECODE_FAILED
    assert error(raw("bdev_lvol_create", {"size_in_mib": 4})) == DECODE_FAILED  # no lvol_name
    assert error(raw("bdev_set_qos_limit", {})) == DECODE_FAILED
    assert (
        raw("bdev_malloc_create", {"num_blocks": 8, "block_size": 4096, "name": "m0"})["result"]
        == "m0"
    )
    assert raw("nvmf_create_subsystem", {"nqn": "nqn.2016-06.io.spdk:x"})["result"] is True
    ns = {"nqn": "nqn.2016-06.io.spdk:x", "namespace": {"bdev_name": "m0", "colour": "blue"}}
    assert error(raw("nvmf_subsystem_add_ns", ns)) == INVALID
    assert error(raw("nvmf_get_subsystems", {"colour": "blue"})) == INVALID


def test_refusals_carry_spdk_tgts_codes(raw: Callable[..., dict[str, Any]]) -> None:
    nqn = "nqn.2016-06.io.spdk:x"
    host = "nqn.2014-08.org.nvmexpress:uuid:0a0a0a0a-0000-4000-8000-00000000000a"
    raw("bdev_malloc_create", {"num_blocks": 16384, "block_size": 4096, "name": "m0"})
    raw("bdev_lvol_create_lvstore", {"bdev_name": "m0", "lvs_name": "lvs"})
    lvol = {"lvs_name": "lvs", "lvol_name": "v", "size_in_mib": 4}
    uuid = raw("bdev_lvol_create", lvol)["result"]
    assert error(raw("bdev_lvol_create", lvol)) == (-17, "File exists")
    assert error(raw("bdev_set_qos_limit", {"name": uuid})) == (-22, "No rate limits specified")
    assert raw("nvmf_create_transport", {"trtype": "TCP"})["result"] is True
    assert error(raw("nvmf_create_transport", {"trtype": "TCP"}))[0] == -32603
    assert error(raw("nvmf_get_subsystems", {"nqn": nqn})) == (-19, "No such device")
    raw("nvmf_create_subsystem", {"nqn": nqn})
    assert error(raw("nvmf_subsystem_remove_host", {"nqn": nqn, "host": host}))[0] == -32603


def test_aio_files_must_exist_and_hold_whole_blocks(
    raw: Callable[..., dict[str, Any]], short_dir: Path
) -> None:
    def create(path: Path) -> dict[str, Any]:
        return raw("bdev_aio_create", {"filename": str(path), "name": "f0", "block_size": 4096})

    assert error(create(short_dir / "missing.img")) == (-2, "No such file or directory")
    assert error(create(short_dir)) == (-21, "Is a directory")
    odd = short_dir / "odd.img"
    odd.write_bytes(bytes(4096 + 512))
    assert error(create(odd)) == (-22, "Invalid argument")
    whole = short_dir / "whole.img"
    whole.write_bytes(bytes(8 * 4096))
    assert create(whole)["result"] == "f0"
    assert raw("bdev_get_bdevs", {"name": "f0"})["result"][0]["num_blocks"] == 8
    assert raw("bdev_aio_delete", {"name": "f0"})["result"] is True


def test_listeners_newest_first_with_normalised_families(
    raw: Callable[..., dict[str, Any]],
) -> None:
    nqn = "nqn.2016-06.io.spdk:x"
    ports = [str(unused_port()), str(unused_port())]
    raw("nvmf_create_transport", {"trtype": "TCP"})
    raw("nvmf_create_subsystem", {"nqn": nqn})
    for port, (trtype, adrfam) in zip(ports, (("tcp", "ipv4"), ("TCP", "IPv4")), strict=True):
        address = {"trtype": trtype, "adrfam": adrfam, "traddr": "127.0.0.1", "trsvcid": port}
        assert raw("nvmf_subsystem_add_listener", {"nqn": nqn, "listen_address": address})["result"]
    (sub,) = raw("nvmf_get_subsystems", {"nqn": nqn})["result"]
    assert sub["listen_addresses"] == [
        {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port}
        for port in reversed(ports)
    ]


def test_lvstores_and_lvols_count_whole_clusters(raw: Callable[..., dict[str, Any]]) -> None:
    raw("bdev_malloc_create", {"num_blocks": 1024, "block_size": 4096, "name": "tiny"})
    raw("bdev_lvol_create_lvstore", {"bdev_name": "tiny", "lvs_name": "none"})
    (empty,) = raw("bdev_lvol_get_lvstores", {"lvs_name": "none"})["result"]
    assert (empty["total_data_clusters"], empty["cluster_size"]) == (0, 4 * MIB)
    raw("bdev_malloc_create", {"num_blocks": 16384, "block_size": 4096, "name": "m0"})
    raw("bdev_lvol_create_lvstore", {"bdev_name": "m0", "lvs_name": "lvs"})
    uuid = raw("bdev_lvol_create", {"lvs_name": "lvs", "lvol_name": "v", "size_in_mib": 5})[
        "result"
    ]
    (lvs,) = raw("bdev_lvol_get_lvstores", {"lvs_name": "lvs"})["result"]
    assert (lvs["total_data_clusters"], lvs["free_clusters"]) == (15, 13)

    def allocated() -> tuple[int, int]:
        (bdev,) = raw("bdev_get_bdevs", {"name": uuid})["result"]
        clusters = bdev["driver_specific"]["lvol"]["num_allocated_clusters"]
        return bdev["num_blocks"] * bdev["block_size"], clusters

    assert allocated() == (8 * MIB, 2)
    raw("bdev_lvol_resize", {"name": uuid, "size_in_mib": 13})
    assert allocated() == (16 * MIB, 4)


def test_qos_changes_need_the_bdev_open(raw: Callable[..., dict[str, Any]]) -> None:
    """A limited bdev with no I/O channel refuses every QoS change until it is opened."""
    raw("bdev_malloc_create", {"num_blocks": 16384, "block_size": 4096, "name": "m0"})

    def qos(**limits: int) -> dict[str, Any]:
        return raw("bdev_set_qos_limit", {"name": "m0", **limits})

    def limits() -> dict[str, int]:
        (bdev,) = raw("bdev_get_bdevs", {"name": "m0"})["result"]
        return {k: v for k, v in bdev["assigned_rate_limits"].items() if v}

    assert qos(rw_ios_per_sec=1001)["result"] is True
    assert limits() == {"rw_ios_per_sec": 2000}  # rounded up to a multiple of 1000
    eagain = (-32602, "Failed to configure rate limit: Resource temporarily unavailable")
    assert error(qos(rw_ios_per_sec=5000)) == eagain
    assert error(qos(rw_ios_per_sec=0)) == eagain
    nqn = "nqn.2016-06.io.spdk:x"
    raw("nvmf_create_subsystem", {"nqn": nqn})
    raw("nvmf_subsystem_add_ns", {"nqn": nqn, "namespace": {"bdev_name": "m0"}})
    assert qos(rw_ios_per_sec=5000)["result"] is True
    assert limits() == {"rw_ios_per_sec": 5000}
    assert qos(rw_ios_per_sec=0)["result"] is True
    raw("nvmf_delete_subsystem", {"nqn": nqn})
    assert qos(w_mbytes_per_sec=10)["result"] is True  # unlimited: a first limit goes in
    assert error(qos(w_mbytes_per_sec=0)) == eagain


def test_iostat_counts_without_queue_depth_sampling(raw: Callable[..., dict[str, Any]]) -> None:
    raw("bdev_malloc_create", {"num_blocks": 16, "block_size": 4096, "name": "m0"})
    iostat = raw("bdev_get_iostat", {"names": ["m0"]})["result"]
    assert iostat["tick_rate"] > 0 and iostat["ticks"] > 0
    (m0,) = iostat["bdevs"]
    assert {"num_read_ops", "bytes_read", "read_latency_ticks", "write_latency_ticks"} <= set(m0)
    assert not {"queue_depth", "io_time", "weighted_io_time"} & set(m0)


def test_lvol_create_returns_the_uuid_and_bdev_shape(raw: Callable[..., dict[str, Any]]) -> None:
    raw("bdev_malloc_create", {"num_blocks": 16384, "block_size": 4096, "name": "m0"})
    lvs_uuid = raw("bdev_lvol_create_lvstore", {"bdev_name": "m0", "lvs_name": "lvs"})["result"]
    lvol_uuid = raw("bdev_lvol_create", {"lvs_name": "lvs", "lvol_name": "v", "size_in_mib": 5})[
        "result"
    ]
    (bdev,) = raw("bdev_get_bdevs", {"name": "lvs/v"})["result"]
    assert bdev["name"] == bdev["uuid"] == lvol_uuid
    assert bdev["aliases"] == ["lvs/v"] and bdev["product_name"] == "Logical Volume"
    assert bdev["block_size"] * bdev["num_blocks"] == 8 * MIB
    assert bdev["driver_specific"]["lvol"]["lvol_store_uuid"] == lvs_uuid
    assert bdev["assigned_rate_limits"] == {
        "rw_ios_per_sec": 0,
        "rw_mbytes_per_sec": 0,
        "r_mbytes_per_sec": 0,
        "w_mbytes_per_sec": 0,
    }


def test_malloc_pools_come_back_empty_after_restart(
    target: Target, engine: SpdkEngine, short_dir: Path
) -> None:
    spec = StorageSpec(
        pools=(PoolSpec(name="ram", devices=(Device(kind="malloc", size_bytes=64 * MIB),)),),
        volumes=(VolumeSpec(name="scratch", pool="ram", tenant="acme", size_bytes=4 * MIB),),
    )
    engine.reconcile(spec)
    engine.save_config(short_dir / "spdk.json")
    target.restart(short_dir / "spdk.json")
    again = SpdkEngine(target.socket)
    assert again.observe().volumes == ()
    assert {str(a) for a in again.reconcile(spec).actions} == {
        "create pool ram (lvstore on ram_malloc)",
        "create volume acme/scratch (4194304 bytes in ram)",
    }
    again.close()


# ---- engine paths that need emulated hardware -------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_iostat_deltas_become_iops_mb_s_and_latency(short_dir: Path) -> None:
    clock = FakeClock()
    with SpdkEmulator(short_dir / "s.sock", clock=clock, tick_rate=1_000_000) as emulator:
        engine = SpdkEngine(emulator.socket_path)
        engine.reconcile(
            StorageSpec(
                pools=(
                    PoolSpec(name="fast", devices=(Device(kind="malloc", size_bytes=64 * MIB),)),
                ),
                volumes=(VolumeSpec(name="llama", pool="fast", tenant="acme", size_bytes=8 * MIB),),
            )
        )
        emulator.record_io("fast/acme.llama", reads=10, bytes_read=10 * MIB, read_latency_s=0.01)
        assert engine.stats() == {}
        emulator.record_io(
            "fast/acme.llama",
            reads=4000,
            bytes_read=400 * MIB,
            read_latency_s=0.8,
            writes=1000,
            bytes_written=100 * MIB,
            write_latency_s=2.0,
        )
        clock.now += 2.0
        rates = engine.stats()["llama"]
        assert rates.interval_s == pytest.approx(2.0)
        assert (rates.read_iops, rates.write_iops) == (pytest.approx(2000), pytest.approx(500))
        assert (rates.read_mb_s, rates.write_mb_s) == (pytest.approx(200), pytest.approx(50))
        assert rates.mean_read_latency_us == pytest.approx(200)
        assert rates.mean_write_latency_us == pytest.approx(2000)
        engine.close()


def test_nvme_pool_is_attached_by_pcie_address_and_survives_restart(short_dir: Path) -> None:
    drive = short_dir / "nvme0.img"
    drive.write_bytes(b"")
    with open(drive, "wb") as f:
        f.truncate(256 * MIB)
    traddr = "0000:5e:00.0"
    emulator = SpdkEmulator(short_dir / "s.sock", nvme_devices={traddr: drive}).start()
    spec = StorageSpec(
        pools=(PoolSpec(name="nvme", devices=(Device(kind="nvme", address=traddr),)),),
        volumes=(VolumeSpec(name="llama", pool="nvme", tenant="acme", size_bytes=100 * MIB),),
        exports=(ExportSpec(tenant="acme", hosts=(HOST,), listen_address="127.0.0.1"),),
    )
    engine = SpdkEngine(emulator.socket_path)
    engine.reconcile(spec)
    assert (
        "bdev_nvme_attach_controller",
        {"name": "nvme_nvme", "trtype": "PCIe", "traddr": traddr},
    ) in emulator.calls
    assert engine.observe().pools[0].backing == ("nvme_nvmen1",)
    before = engine.observe()
    engine.save_config(short_dir / "spdk.json")
    engine.close()

    emulator.stop()
    with SpdkEmulator(
        emulator.socket_path, config=short_dir / "spdk.json", nvme_devices={traddr: drive}
    ) as restarted:
        again = SpdkEngine(restarted.socket_path)
        assert again.observe() == before
        assert not again.reconcile(spec).changed
        again.reconcile(StorageSpec())
        assert ("bdev_nvme_detach_controller", {"name": "nvme_nvme"}) in restarted.calls
        again.close()

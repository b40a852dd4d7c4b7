"""SpdkEngine against an SPDK target: a spdk_tgt of its own when SPDK_TGT_BIN is set, the
emulator otherwise (see conftest.py)."""

from __future__ import annotations

import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dataplane.storage.engine import (
    CapacityError,
    Device,
    EngineUnavailable,
    ExportSpec,
    PoolSpec,
    QosSpec,
    RpcError,
    SpecError,
    StorageSpec,
    Transport,
    VolumeSpec,
)
from dataplane.storage.spdk import SpdkEngine

from .conftest import Target, unused_port

MIB = 1 << 20
HOST_A = "nqn.2014-08.org.nvmexpress:uuid:0a0a0a0a-0000-4000-8000-00000000000a"
HOST_B = "nqn.2014-08.org.nvmexpress:uuid:0b0b0b0b-0000-4000-8000-00000000000b"


def malloc_pool(name: str = "fast", mib: int = 64) -> PoolSpec:
    return PoolSpec(name=name, devices=(Device(kind="malloc", size_bytes=mib * MIB),))


@pytest.fixture
def port() -> int:
    return unused_port()


def full_spec(port: int, **qos: int) -> StorageSpec:
    return StorageSpec(
        pools=(malloc_pool(),),
        volumes=(
            VolumeSpec(name="llama", pool="fast", tenant="acme", size_bytes=8 * MIB),
            VolumeSpec(name="mistral", pool="fast", tenant="acme", size_bytes=5 * MIB),
            VolumeSpec(name="phi", pool="fast", tenant="globex", size_bytes=4 * MIB),
        ),
        exports=(
            ExportSpec(
                tenant="acme", hosts=(HOST_A,), listen_address="127.0.0.1", listen_port=port
            ),
        ),
        qos=(QosSpec(volume="llama", **qos),) if qos else (),
    )


def test_probe_reports_version_and_transports(engine: SpdkEngine) -> None:
    caps = engine.probe()
    assert caps.engine == "spdk"
    assert caps.version.startswith("SPDK v")
    assert caps.exports and caps.transports == (Transport.TCP,)
    assert caps.qos and caps.direct_io


def test_reconcile_builds_everything_and_is_idempotent(engine: SpdkEngine, port: int) -> None:
    first = engine.reconcile(full_spec(port, rw_ios_per_sec=2000))
    kinds = {(a.verb, a.kind) for a in first.actions}
    assert {("create", "pool"), ("create", "volume"), ("create", "export"), ("set", "qos")} <= kinds

    second = engine.reconcile(full_spec(port, rw_ios_per_sec=2000))
    assert second.actions == () and not second.changed

    state = engine.observe()
    assert [p.name for p in state.pools] == ["fast"]
    sizes = {v.name: (v.tenant, v.size_bytes) for v in state.volumes}
    # lvols round up to the lvstore's cluster size (4 MiB by default)
    assert sizes == {
        "llama": ("acme", 8 * MIB),
        "mistral": ("acme", 8 * MIB),
        "phi": ("globex", 4 * MIB),
    }
    (export,) = state.exports
    assert export.tenant == "acme" and export.nqn == engine.nqn("acme")
    assert export.hosts == (HOST_A,)
    assert export.volumes == ("llama", "mistral")
    assert (export.transport, export.listen_address, export.listen_port) == (
        Transport.TCP,
        "127.0.0.1",
        port,
    )


def test_removed_volumes_and_exports_are_deleted(engine: SpdkEngine, port: int) -> None:
    engine.reconcile(full_spec(port))
    spec = full_spec(port)
    smaller = StorageSpec(
        pools=spec.pools,
        volumes=tuple(v for v in spec.volumes if v.name != "mistral"),
        exports=(spec.exports[0].model_copy(update={"hosts": (HOST_B,)}),),
    )
    result = engine.reconcile(smaller)
    assert {str(a) for a in result.actions} >= {
        "delete volume mistral",
        f"allow host {HOST_B} ({engine.nqn('acme')})",
    }
    state = engine.observe()
    assert sorted(v.name for v in state.volumes) == ["llama", "phi"]
    assert state.exports[0].volumes == ("llama",) and state.exports[0].hosts == (HOST_B,)
    assert not engine.reconcile(smaller).changed

    engine.reconcile(StorageSpec())
    assert engine.observe().pools == () and engine.observe().volumes == ()


def test_qos_is_rounded_like_spdk_and_read_back(engine: SpdkEngine, port: int) -> None:
    engine.reconcile(full_spec(port, rw_ios_per_sec=1500, r_mbytes_per_sec=20))
    llama = engine.observe().volume("llama")
    assert llama is not None
    assert llama.qos.limits() == {
        "rw_ios_per_sec": 2000,
        "rw_mbytes_per_sec": 0,
        "r_mbytes_per_sec": 20,
        "w_mbytes_per_sec": 0,
    }
    assert not engine.reconcile(full_spec(port, rw_ios_per_sec=1500, r_mbytes_per_sec=20)).changed

    engine.reconcile(full_spec(port))  # no QoS entry: unlimited again
    llama = engine.observe().volume("llama")
    assert llama is not None and not any(llama.qos.limits().values())


def test_qos_converges_on_unexported_volumes_too(engine: SpdkEngine, port: int) -> None:
    """SPDK refuses QoS changes on a limited bdev no one holds open (EAGAIN, for good);
    phi (globex's, which has no export) changes limits and loses them all the same."""

    def phi_spec(**limits: int) -> StorageSpec:
        spec = full_spec(port)
        return spec.model_copy(update={"qos": (QosSpec(volume="phi", **limits),) if limits else ()})

    def phi_limits() -> dict[str, int]:
        phi = engine.observe().volume("phi")
        assert phi is not None
        return {k: v for k, v in phi.qos.limits().items() if v}

    for limits in ({"rw_ios_per_sec": 2000}, {"rw_ios_per_sec": 5000, "w_mbytes_per_sec": 10}, {}):
        result = engine.reconcile(phi_spec(**limits))
        assert [str(a) for a in result.actions if a.kind == "qos"] == [
            f"set qos phi ({QosSpec(volume='phi', **limits).describe()})"
        ]
        assert phi_limits() == limits
        assert not engine.reconcile(phi_spec(**limits)).changed
    assert [e.tenant for e in engine.observe().exports] == ["acme"]
    nqns = {s["nqn"] for s in engine.call("nvmf_get_subsystems")}
    assert nqns == {"nqn.2014-08.org.nvmexpress.discovery", engine.nqn("acme")}


def test_target_itself_rounds_iops_up_to_a_multiple_of_1000(engine: SpdkEngine, port: int) -> None:
    engine.reconcile(full_spec(port))
    llama = engine.observe().volume("llama")
    assert llama is not None
    engine.call("bdev_set_qos_limit", name=llama.device, rw_ios_per_sec=1001)
    (bdev,) = engine.call("bdev_get_bdevs", name=llama.device)
    assert bdev["assigned_rate_limits"]["rw_ios_per_sec"] == 2000


def test_volume_over_capacity_raises_before_changing_anything(engine: SpdkEngine) -> None:
    engine.reconcile(StorageSpec(pools=(malloc_pool(),)))
    (pool,) = engine.observe().pools
    too_big = StorageSpec(
        pools=(malloc_pool(),),
        volumes=(
            VolumeSpec(name="small", pool="fast", tenant="acme", size_bytes=4 * MIB),
            VolumeSpec(name="huge", pool="fast", tenant="acme", size_bytes=pool.free_bytes),
        ),
    )
    with pytest.raises(CapacityError) as caught:
        engine.reconcile(too_big)
    assert caught.value.pool == "fast"
    assert caught.value.requested_bytes == pool.free_bytes + 4 * MIB
    assert caught.value.free_bytes == pool.free_bytes
    assert "fast" in str(caught.value) and str(pool.free_bytes) in str(caught.value)
    assert engine.observe().volumes == ()


def test_volumes_grow_but_never_shrink(engine: SpdkEngine, port: int) -> None:
    spec = full_spec(port)
    engine.reconcile(spec)
    grown = spec.model_copy(
        update={
            "volumes": (
                spec.volumes[0].model_copy(update={"size_bytes": 16 * MIB}),
                *spec.volumes[1:],
            )
        }
    )
    assert [str(a) for a in engine.reconcile(grown).actions] == ["grow volume llama (to 16 MiB)"]
    llama = engine.observe().volume("llama")
    assert llama is not None and llama.size_bytes == 16 * MIB
    with pytest.raises(SpecError, match="shrinking"):
        engine.reconcile(spec)


def test_lvol_names_longer_than_spdk_allows_are_refused(engine: SpdkEngine) -> None:
    long = VolumeSpec(name="v" * 40, pool="fast", tenant="t" * 40, size_bytes=MIB)
    with pytest.raises(SpecError, match="longer than SPDK's 63"):
        engine.reconcile(StorageSpec(pools=(malloc_pool(),), volumes=(long,)))


def test_rpc_errors_carry_method_and_code(engine: SpdkEngine) -> None:
    with pytest.raises(RpcError) as missing:
        engine.call("bdev_lvol_delete", name="no-such-lvol")
    assert missing.value.method == "bdev_lvol_delete"
    assert missing.value.code < 0
    assert "bdev_lvol_delete" in str(missing.value) and str(missing.value.code) in str(
        missing.value
    )

    with pytest.raises(RpcError) as unknown:
        engine.call("bdev_make_coffee")
    assert (unknown.value.method, unknown.value.code) == ("bdev_make_coffee", -32601)

    with pytest.raises(RpcError) as bad_param:
        engine.call("bdev_get_bdevs", colour="blue")
    assert (bad_param.value.code, bad_param.value.rpc_message) == (
        -32603,
        "spdk_json_decode_object failed",
    )


def test_threads_each_get_their_own_client(engine: SpdkEngine, port: int) -> None:
    engine.reconcile(full_spec(port))
    expected = engine.observe()
    with ThreadPoolExecutor(4) as pool:
        seen = list(pool.map(lambda _: engine.observe(), range(32)))
    # one shared socket would interleave requests and responses across threads
    assert all(state == expected for state in seen)


def test_transport_follows_rdma_availability(target: Target, engine: SpdkEngine, port: int) -> None:
    tcp = SpdkEngine(target.socket, rdma_port_active=False)
    tcp.reconcile(full_spec(port))
    assert tcp.observe().exports[0].transport is Transport.TCP
    tcp.close()

    rdma = SpdkEngine(target.socket, rdma_port_active=True)
    assert rdma.probe().transports == (Transport.RDMA, Transport.TCP)
    if not target.rdma_capable:
        with pytest.raises(RpcError) as caught:
            rdma.reconcile(full_spec(port))
        assert (caught.value.method, caught.value.code) == ("nvmf_create_transport", -32603)
        assert caught.value.rpc_message == "Failed to create transport."
    else:
        rdma_port = unused_port()
        result = rdma.reconcile(full_spec(rdma_port))
        assert "create transport RDMA" in {str(a) for a in result.actions}
        (export,) = rdma.observe().exports
        assert (export.transport, export.listen_port) == (Transport.RDMA, rdma_port)
        assert not rdma.reconcile(full_spec(rdma_port)).changed
    rdma.close()


def test_stats_report_deltas_per_volume(engine: SpdkEngine, port: int) -> None:
    engine.reconcile(full_spec(port))
    assert engine.stats() == {}  # first sample is the baseline
    rates = engine.stats()
    assert set(rates) == {"llama", "mistral", "phi"}
    assert all(r.iops == 0 and r.mb_s == 0 for r in rates.values())


def test_saved_config_brings_a_restarted_target_back(
    target: Target, engine: SpdkEngine, short_dir: Path, port: int
) -> None:
    disk = short_dir / "pool.img"
    spec = StorageSpec(
        pools=(
            PoolSpec(
                name="disk", devices=(Device(kind="aio", address=str(disk), size_bytes=64 * MIB),)
            ),
        ),
        volumes=(VolumeSpec(name="llama", pool="disk", tenant="acme", size_bytes=8 * MIB),),
        exports=(
            ExportSpec(
                tenant="acme", hosts=(HOST_A,), listen_address="127.0.0.1", listen_port=port
            ),
        ),
        qos=(QosSpec(volume="llama", rw_ios_per_sec=3000, w_mbytes_per_sec=50),),
    )
    engine.reconcile(spec)
    before = engine.observe()
    config = short_dir / "spdk.json"
    engine.save_config(config)
    assert '"bdev_aio_create"' in config.read_text()

    target.restart(config)

    after_restart = SpdkEngine(target.socket)
    assert after_restart.observe() == before
    assert not after_restart.reconcile(spec).changed
    after_restart.close()


def test_missing_socket_says_which_path_and_how_to_start(tmp_path: Path) -> None:
    socket = tmp_path / "nowhere.sock"
    with pytest.raises(EngineUnavailable) as caught:
        SpdkEngine(socket).probe()
    message = str(caught.value)
    assert str(socket) in message
    assert f"spdk_tgt -r {socket}" in message


def test_stale_socket_file_says_nobody_is_listening(short_dir: Path) -> None:
    path = short_dir / "stale.sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    sock.close()  # the file stays, like after a crashed spdk_tgt
    with pytest.raises(EngineUnavailable, match="cannot connect") as caught:
        SpdkEngine(path).observe()
    assert "Connection refused" in str(caught.value) and "spdk_tgt -r" in str(caught.value)

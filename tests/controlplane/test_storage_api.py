"""Storage through the REST API: artifact uploads and downloads, volume placement, pools,
agents' storage reports, and the storage part of the desired state."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from agent.protocol import PoolSpec
from controlplane.core.asgi import PooledThreadASGIHandler
from controlplane.fleet import services as fleet
from controlplane.fleet.models import Replica, Revision
from controlplane.storage import services as storage
from controlplane.storage.api import downloads
from controlplane.storage.models import Artifact, Export, Pool, Volume
from tests.controlplane.conftest import World, http_scope, make_node
from tests.controlplane.storage_helpers import (
    MIB,
    archive_bytes,
    as_node,
    deployed_artifact,
    make_artifact,
    make_pool,
    node_credential,
    ready_node,
    upload,
)

HOST_NQN = "nqn.2014-08.org.nvmexpress:uuid:0a0a0a0a-0000-4000-8000-00000000000a"


def test_upload_checksum_is_computed_by_the_server_and_ranges_are_served(
    world: World, client_for: Any
) -> None:
    client = client_for(world.admin_a)
    data = archive_bytes()
    response = upload(client, world.tenant_a)
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["sha256"], body["size_bytes"]) == (hashlib.sha256(data).hexdigest(), len(data))
    assert sorted(f["name"] for f in body["files"]) == [
        "config.json",
        "model.onnx",
        "tokenizer.json",
    ]
    assert Artifact.objects.get(pk=body["id"]).path.read_bytes() == data

    url = body["download_url"]
    whole = client.get(url)
    assert whole.status_code == 200 and b"".join(whole.streaming_content) == data
    part = client.get(url, HTTP_RANGE="bytes=10-19")
    assert part.status_code == 206 and part["Content-Range"] == f"bytes 10-19/{len(data)}"
    assert b"".join(part.streaming_content) == data[10:20]
    past = client.get(url, HTTP_RANGE=f"bytes={len(data)}-")
    assert past.status_code == 416 and past["Content-Range"] == f"bytes */{len(data)}"


def test_a_corrupted_upload_is_refused_and_nothing_is_kept(world: World, client_for: Any) -> None:
    expected = hashlib.sha256(archive_bytes()).hexdigest()
    corrupted = bytearray(archive_bytes())
    corrupted[700] ^= 0xFF
    kept = set((settings.DATA_DIR / "artifacts").glob("*.tar"))
    response = upload(
        client_for(world.admin_a), world.tenant_a, data=bytes(corrupted), sha256=expected
    )
    assert response.status_code == 400
    assert f"not {expected}" in response.json()["sha256"][0]
    assert not Artifact.objects.exists()
    assert set((settings.DATA_DIR / "artifacts").glob("*.tar")) == kept


def test_bad_uploads_are_refused_by_field(world: World, client_for: Any) -> None:
    client = client_for(world.admin_a)
    cases = [
        ({"data": b"not a tar at all"}, "file", "Not a readable tar archive"),
        (
            {"data": archive_bytes({"model.onnx": b"x", "config.json": b"{}"})},
            "file",
            "tokenizer.json",
        ),
        ({"sha256": "ABC"}, "sha256", "does not match"),
        ({"name": "Not A Slug"}, "name", "lowercase"),
        ({"colour": "blue"}, "colour", "Unknown field"),
    ]
    for change, field, words in cases:
        response = upload(client, world.tenant_a, **change)
        assert response.status_code == 400, (change, response.content)
        assert words in str(response.json()[field]), (change, response.json())
    response = client.post(
        "/api/v1/artifacts/", {"tenant": str(world.tenant_a.pk), "name": "x"}, format="json"
    )
    assert response.status_code == 415  # uploads are multipart


def test_volumes_are_placed_where_there_is_room_and_refused_naming_the_pool(
    world: World, client_for: Any
) -> None:
    node = ready_node("store-1", world.tenant_a)
    pool = make_pool(node, capacity=100 * MIB)
    client = client_for(world.admin_a)
    tenant = str(world.tenant_a.pk)

    response = client.post(
        "/api/v1/volumes/",
        {"tenant": tenant, "name": "data", "size_bytes": 60 * MIB},
        format="json",
    )
    assert response.status_code == 201, response.content
    volume = response.json()
    assert (volume["pool"], volume["node"]) == (str(pool.pk), str(node.pk))

    response = client.post(
        "/api/v1/volumes/",
        {"tenant": tenant, "name": "more", "size_bytes": 60 * MIB},
        format="json",
    )
    assert response.status_code == 400
    assert response.json()["size_bytes"] == [
        f"No storage pool has room for {60 * MIB} bytes; the most free is pool models on node "
        f"store-1 with {40 * MIB} bytes."
    ]
    response = client.post(
        "/api/v1/volumes/",
        {"tenant": tenant, "name": "more", "pool": str(pool.pk), "size_bytes": 60 * MIB},
        format="json",
    )
    assert response.status_code == 400
    assert (
        f"Pool models on node store-1 has {40 * MIB} bytes free" in response.json()["size_bytes"][0]
    )

    url = f"/api/v1/volumes/{volume['id']}/"
    for change, field, words in [
        ({"size_bytes": 120 * MIB}, "size_bytes", f"has {40 * MIB} bytes free"),
        ({"size_bytes": MIB}, "size_bytes", "never shrink"),
        ({"pool": str(make_pool(node, name="other").pk)}, "pool", "Set when created"),
        ({"size_bytes": 0}, "size_bytes", "greater than or equal to 1"),
        ({"device": "v-1"}, "device", "read-only"),
    ]:
        response = client.patch(url, change, format="json")
        assert response.status_code == 400, (change, response.content)
        assert words in str(response.json()[field]), (change, response.json())
    assert client.patch(url, {"size_bytes": 90 * MIB}, format="json").status_code == 200

    other = client_for(world.admin_b).post(
        "/api/v1/volumes/",
        {"tenant": str(world.tenant_b.pk), "name": "x", "pool": str(pool.pk), "size_bytes": MIB},
        format="json",
    )
    assert other.status_code == 400 and "does not exist" in str(other.json()["pool"])


def test_pools_are_checked_and_changed_by_platform_admins_only(
    world: World, client_for: Any
) -> None:
    node = ready_node("store-2", world.tenant_a)
    body = {"node": str(node.pk), "name": "nvme0", "kind": "spdk", "device": "0000:5e:00.0"}
    assert client_for(world.admin_a).post("/api/v1/pools/", body, format="json").status_code == 403
    client = client_for(world.platform)
    for change, field, words in [
        ({"device": ""}, "kind", "names its NVMe device"),
        ({"device": "5e:00.0"}, "device", "should match pattern"),
        ({"aio_path": "/srv/pool.img"}, "kind", "device or its aio_path (one of them)"),
        ({"capacity_bytes": 1 << 30}, "kind", "takes the drive's capacity"),
        ({"device": "", "aio_path": "pool.img"}, "aio_path", "should match pattern"),
        (
            {"device": "", "aio_path": "/srv/pool.img", "capacity_bytes": 10**9},
            "capacity_bytes",
            "multiple of 4096",
        ),
        ({"kind": "local", "device": "0000:5e:00.0"}, "kind", "names no device"),
        ({"kind": "local", "device": "", "aio_path": "/srv/x"}, "kind", "no device or aio_path"),
        ({"kind": "local", "device": "", "directory": "relative/dir"}, "directory", "should match"),
        ({"name": "NVMe 0"}, "name", "lowercase"),
    ]:
        response = client.post("/api/v1/pools/", {**body, **change}, format="json")
        assert response.status_code == 400, (change, response.content)
        assert words in str(response.json()[field]), (change, response.json())
    response = client.post("/api/v1/pools/", body, format="json")
    assert response.status_code == 201, response.content
    assert response.json()["allocated_bytes"] == 0
    # no NVMe drive to spare: an SPDK pool on a file, created at its capacity when missing
    aio = {**body, "name": "file0", "device": "", "aio_path": "/srv/pool.img"}
    response = client.post("/api/v1/pools/", {**aio, "capacity_bytes": 1 << 30}, format="json")
    assert response.status_code == 201, response.content
    assert (response.json()["aio_path"], response.json()["device"]) == ("/srv/pool.img", "")
    assert Pool.objects.get(pk=response.json()["id"]).spec() == PoolSpec(
        name="file0", kind="spdk", aio_path="/srv/pool.img", capacity_bytes=1 << 30
    )

    pool = make_pool(node, name="local", capacity=10 * MIB)
    storage.create_volume(tenant=world.tenant_a, name="kept", size_bytes=MIB, pool=pool)
    response = client.delete(f"/api/v1/pools/{pool.pk}/")
    assert response.status_code == 409 and "still has 1 volume" in response.json()["detail"]
    response = client.patch(
        f"/api/v1/pools/{pool.pk}/", {"directory": "/srv/elsewhere"}, format="json"
    )
    assert response.status_code == 400 and "strand" in str(response.json()["directory"])


def test_storage_reports_land_on_pools_and_exports(world: World) -> None:
    node = ready_node("store-3", world.tenant_a)
    pool = make_pool(node, capacity=None, kind="spdk", device="0000:5e:00.0", name="nvme0")
    Export.objects.create(tenant=world.tenant_a, hosts=[HOST_NQN])
    agent = as_node(node)
    report = {
        "schema_version": 1,
        "node_id": str(node.pk),
        "reported_at": datetime.now(UTC).isoformat(),
        "engine": "spdk",
        "pools": [{"name": "nvme0", "capacity_bytes": 64 * MIB, "free_bytes": 60 * MIB}],
        "volumes": [
            {
                "name": "v-1",
                "pool": "nvme0",
                "read_iops": 10.0,
                "write_iops": 0.0,
                "read_mb_s": 1.5,
                "write_mb_s": 0.0,
                "mean_read_latency_us": 80.0,
                "mean_write_latency_us": 0.0,
            }
        ],
        "exports": [
            {
                "tenant_id": str(world.tenant_a.pk),
                "nqn": f"nqn.2024-06.io.tailguard:{world.tenant_a.pk.hex}",
                "transport": "tcp",
                "address": "10.0.0.7",
                "port": 4420,
            }
        ],
    }
    response = agent.post(
        "/api/v1/agent/storage/", json.dumps(report), content_type="application/json"
    )
    assert response.status_code == 204, response.content
    pool.refresh_from_db()
    assert (pool.reported_capacity_bytes, pool.reported_free_bytes) == (64 * MIB, 60 * MIB)
    assert pool.volume_io["v-1"]["read_mb_s"] == 1.5
    (endpoint,) = Export.objects.get().endpoints
    assert endpoint == {
        "node": str(node.pk),
        "hostname": "store-3",
        "nqn": report["exports"][0]["nqn"],
        "transport": "tcp",
        "address": "10.0.0.7",
        "port": 4420,
    }

    for change, field in [
        ({"node_id": str(world.tenant_b.pk)}, "node_id"),
        ({"engine": "ceph"}, "engine"),
        ({"pools": [{"name": "x"}]}, "pools.0.capacity_bytes"),
    ]:
        response = agent.post(
            "/api/v1/agent/storage/",
            json.dumps({**report, **change}),
            content_type="application/json",
        )
        assert response.status_code == 400 and field in response.json(), (change, response.content)


def _components(node: Any) -> dict[str, Any]:
    return (
        Revision.objects.filter(node=node)
        .order_by("-generation")
        .first()
        .document["state"]["components"]
    )


def test_desired_state_carries_pools_volumes_exports_qos_and_the_staged_model(
    world: World, settings: Any
) -> None:
    settings.PUBLIC_URL = "https://cp.example"
    tenant = world.tenant_a
    node = ready_node("store-4", tenant)
    nvme = make_pool(node, capacity=None, kind="spdk", device="0000:5e:00.0", name="nvme0")
    Pool.objects.filter(pk=nvme.pk).update(reported_capacity_bytes=64 * MIB)
    nvme.refresh_from_db()
    local = make_pool(node, capacity=64 * MIB, name="models")
    policy = storage.create_qos_policy(tenant=tenant, name="gold", rw_ios_per_sec=5000)
    fast = storage.create_volume(
        tenant=tenant, name="fast", size_bytes=8 * MIB, pool=nvme, qos_policy=policy
    )
    slow = storage.create_volume(tenant=tenant, name="slow", size_bytes=MIB, pool=local)
    storage.create_export(tenant=tenant, hosts=[HOST_NQN])
    artifact = make_artifact(tenant)
    deployment = fleet.create_deployment(
        tenant=tenant, name="chat", model_name="chat", artifact=artifact
    )
    assert deployment.model_volume_bytes == 9 * MIB  # the archive and twice its files, in MiB

    components = _components(node)
    replica = Replica.objects.get(deployment=deployment)
    assert replica.pool == local  # the roomier pool
    assert [p["name"] for p in components["pools"]] == ["models", "nvme0"]
    assert {v["name"]: (v["pool"], v["size_bytes"]) for v in components["volumes"]} == {
        fast.wire_name: ("nvme0", 8 * MIB),
        slow.wire_name: ("models", MIB),
        replica.volume_name: ("models", 9 * MIB),
    }
    (export,) = components["exports"]  # volumes in SPDK pools only
    assert (export["volume"], export["hosts"]) == (fast.wire_name, [HOST_NQN])
    assert components["qos"] == [
        {
            "volume": fast.wire_name,
            "rw_ios_per_sec": 5000,
            "rw_mbytes_per_sec": 0,
            "r_mbytes_per_sec": 0,
            "w_mbytes_per_sec": 0,
        }
    ]
    (worker,) = components["workers"]
    assert worker["volume"] == replica.volume_name
    assert worker["artifact"] == {
        "uri": f"https://cp.example/api/v1/agent/artifacts/{artifact.pk}/",
        "sha256": "a" * 64,
        "size_bytes": 3 * MIB,
    }


def test_a_replica_waits_for_a_pool_with_room_for_its_model(world: World) -> None:
    node = ready_node("store-5", world.tenant_a)
    pool = make_pool(node, capacity=4 * MIB)
    deployment = fleet.create_deployment(
        tenant=world.tenant_a,
        name="chat",
        model_name="chat",
        artifact=make_artifact(world.tenant_a),
    )
    replica = Replica.objects.get(deployment=deployment)
    assert replica.node is None and replica.pool is None
    assert f"1 has no storage pool with {9 * MIB} bytes free" in replica.reason

    storage.update_pool(pool, capacity_bytes=16 * MIB)
    replica.refresh_from_db()
    assert (replica.node, replica.pool) == (node, pool)


def test_deployments_name_exactly_one_model_of_their_own_tenant(
    world: World, client_for: Any
) -> None:
    client = client_for(world.admin_a)
    mine, theirs = make_artifact(world.tenant_a), make_artifact(world.tenant_b)
    body = {"tenant": str(world.tenant_a.pk), "name": "chat", "model_name": "chat"}
    cases = [
        ({"artifact": str(mine.pk), "artifact_uri": "synthetic://x"}, "artifact", "exactly one"),
        ({}, "artifact", "exactly one"),
        ({"artifact": str(theirs.pk)}, "artifact", "does not exist"),
        ({"artifact": str(mine.pk), "model_volume_bytes": MIB}, "model_volume_bytes", "Too small"),
        (
            {"artifact_uri": "synthetic://x", "model_volume_bytes": MIB},
            "model_volume_bytes",
            "Only",
        ),
    ]
    for change, field, words in cases:
        response = client.post("/api/v1/deployments/", {**body, **change}, format="json")
        assert response.status_code == 400, (change, response.content)
        assert words in str(response.json()[field]), (change, response.json())
    response = client.post(
        "/api/v1/deployments/", {**body, "artifact": str(mine.pk)}, format="json"
    )
    assert response.status_code == 201, response.content
    assert response.json()["model_volume_bytes"] == 9 * MIB
    assert client.delete(f"/api/v1/artifacts/{mine.pk}/").status_code == 409  # in use


def test_agents_download_only_artifacts_their_replicas_use(world: World) -> None:
    data = archive_bytes()
    node, stranger = ready_node("store-6", world.tenant_a), make_node("store-7", world.tenant_a)
    artifact = deployed_artifact(world.tenant_a, node, data)
    url = f"/api/v1/agent/artifacts/{artifact.pk}/"

    response = as_node(node).get(url, HTTP_RANGE="bytes=100-")
    assert response.status_code == 206 and b"".join(response.streaming_content) == data[100:]
    assert response["ETag"] == f'"{artifact.sha256}"'
    assert as_node(stranger).get(url).status_code == 404
    assert as_node(node).get(f"/api/v1/agent/artifacts/{uuid.uuid4()}/").status_code == 404


def test_bad_exports_and_qos_policies_are_refused_by_field(world: World, client_for: Any) -> None:
    client = client_for(world.admin_a)
    tenant = str(world.tenant_a.pk)
    cases = [
        ("exports", {"hosts": ["host-1"]}, "hosts", "0: String should match pattern"),
        ("exports", {"hosts": []}, "hosts", "at least 1"),
        ("exports", {"hosts": [7]}, "hosts", "Not a valid string"),
        ("qos-policies", {"name": "gold", "rw_ios_per_sec": -1}, "rw_ios_per_sec", "greater than"),
        (
            "qos-policies",
            {"name": "gold", "w_mbytes_per_sec": "fast"},
            "w_mbytes_per_sec",
            "integer",
        ),
    ]
    for path, body, field, words in cases:
        response = client.post(f"/api/v1/{path}/", {"tenant": tenant, **body}, format="json")
        assert response.status_code == 400, (body, response.content)
        assert words in str(response.json()[field]), (body, response.json())


def test_read_probes_are_set_per_local_volume_and_reach_its_node(
    world: World, client_for: Any
) -> None:
    node = ready_node("store-6", world.tenant_a)
    local = make_pool(node, name="models")
    nvme = make_pool(node, capacity=None, kind="spdk", device="0000:5e:00.0", name="nvme0")
    Pool.objects.filter(pk=nvme.pk).update(reported_capacity_bytes=64 * MIB)
    client = client_for(world.admin_a)

    def create(name: str, pool: Pool, rate: int) -> Any:
        body = {"tenant": str(world.tenant_a.pk), "name": name, "size_bytes": MIB}
        body |= {"pool": str(pool.pk), "read_probe_per_s": rate}
        return client.post("/api/v1/volumes/", body, format="json")

    response = create("probed", local, 200)
    assert response.status_code == 201, response.content
    assert response.json()["read_probe_per_s"] == 200
    refused = create("fast", nvme, 200)
    assert refused.status_code == 400
    assert (
        "measure an SPDK volume's reads at its initiator" in refused.json()["read_probe_per_s"][0]
    )
    too_many = create("busy", local, 10_001)
    assert too_many.status_code == 400 and "read_probe_per_s" in too_many.json()
    assert create("quiet", local, 0).status_code == 201

    volumes = {v["name"]: v for v in _components(node)["volumes"]}
    probed = Volume.objects.get(name="probed")
    quiet = Volume.objects.get(name="quiet")
    assert volumes[probed.wire_name]["read_probe_per_s"] == 200
    assert "read_probe_per_s" not in volumes[quiet.wire_name]  # off: not on the wire at all

    url = f"/api/v1/volumes/{response.json()['id']}/"
    assert client.patch(url, {"read_probe_per_s": 0}, format="json").status_code == 200
    volumes = {v["name"]: v for v in _components(node)["volumes"]}
    assert "read_probe_per_s" not in volumes[probed.wire_name]


@pytest.mark.django_db(transaction=True)
def test_a_download_through_the_asgi_server_streams_rather_than_read_whole_first(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Served by the ASGI handler, the first chunk leaves before the rest is read: cutting
    the file short once it has left shortens the body. (Django reads a synchronous
    iterator whole into memory first there, which for a model means many GiB.)"""
    chunk = 64 * 1024  # above the file's read buffer, which may hold a little more
    monkeypatch.setattr(downloads, "CHUNK_BYTES", chunk)
    data = bytes(range(256)) * (4 * chunk // 256)  # four chunks
    node = ready_node("store-8", world.tenant_a)
    artifact = deployed_artifact(world.tenant_a, node, data)
    credential = node_credential(node)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        if message.get("body") and not any(m.get("body") for m in sent):
            artifact.path.write_bytes(data[:chunk])  # the first chunk has left
        sent.append(message)

    request = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if request:
            return request.pop()
        await asyncio.Event().wait()  # the client stays until the response ends
        raise AssertionError

    scope = http_scope(
        "GET",
        f"/api/v1/agent/artifacts/{artifact.pk}/",
        [(b"authorization", f"Node {credential}".encode())],
    )
    asyncio.run(PooledThreadASGIHandler()(scope, receive, send))
    assert sent[0]["status"] == 200
    body = b"".join(m.get("body", b"") for m in sent[1:])
    assert chunk <= len(body) < 2 * chunk and body == data[: len(body)]


async def test_a_download_whose_client_leaves_mid_read_closes_its_file_after_the_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Django cancels a download whose client left, most likely while a chunk is being read
    on its thread: the file is closed once that read is over, and nothing else fails."""
    reading, finish = threading.Event(), threading.Event()
    closed: list[bool] = []

    def slow_chunks(path: Path, start: int, stop: int) -> Iterator[bytes]:
        try:
            yield b"first"
            reading.set()
            assert finish.wait(60)
            yield b"second"
        finally:
            closed.append(True)

    monkeypatch.setattr(downloads, "_chunks", slow_chunks)
    received: list[bytes] = []

    async def download() -> None:
        async for chunk in downloads._chunks_async(Path("unused"), 0, 10):
            received.append(chunk)

    task = asyncio.create_task(download())
    assert await asyncio.to_thread(reading.wait, 60)  # the second read is under way
    task.cancel()
    await asyncio.sleep(0)  # the cancellation reaches the download first
    finish.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert received == [b"first"] and closed == [True]

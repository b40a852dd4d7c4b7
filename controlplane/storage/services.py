"""All storage mutations: pools, volumes (placed here), QoS policies, exports, artifacts,
and what agents report about their engines.

Refusals are Django `ValidationError`s keyed by the offending field (the API answers 400).
Every change a node must act on ends in `storage_changed`, on which the fleet renders the
affected nodes' desired state and pushes it after commit.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any
from uuid import UUID

from django.core.exceptions import ValidationError
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import Q

from agent.protocol import StorageReport
from controlplane.core import services as core
from controlplane.core.locks import lock_fleet
from controlplane.inventory import selectors as inventory_selectors
from controlplane.inventory.models import Node
from controlplane.storage import selectors, signals
from controlplane.storage.archives import inspect_archive
from controlplane.storage.models import Artifact, Export, Pool, QosPolicy, Volume, artifact_dir

BACKING_FIELDS = ("node", "name", "kind", "directory", "device", "aio_path")


def _changed(cause: str, nodes: Iterable[UUID]) -> None:
    """Tell the fleet, which renders and pushes what these nodes must now run."""
    signals.storage_changed.send(sender=Pool, cause=cause, nodes=nodes)


# --- Pools --------------------------------------------------------------------------------


@transaction.atomic
def create_pool(**fields: Any) -> Pool:
    pool = core.create(Pool, **fields)
    _changed(f"pool {pool} created", [pool.node_id])
    return pool


@transaction.atomic
def update_pool(pool: Pool, **changes: Any) -> Pool:
    """Capacity may change any time; the backing only while the pool holds nothing."""
    lock_fleet()
    moved = [f for f in BACKING_FIELDS if f in changes and changes[f] != getattr(pool, f)]
    allocated = selectors.allocated_bytes(pool)
    if moved and allocated:
        raise ValidationError(
            {
                moved[0]: [
                    f"Pool {pool.name} holds {allocated} bytes of volumes; moving it would strand them."
                ]
            }
        )
    old_node = pool.node_id
    capacity = changes.get("capacity_bytes", pool.capacity_bytes)
    if capacity is not None and capacity < allocated:
        raise ValidationError(
            {"capacity_bytes": [f"Pool {pool.name} already holds {allocated} bytes of volumes."]}
        )
    core.update(pool, **changes)
    _changed(f"pool {pool} changed", {old_node, pool.node_id})
    return pool


@transaction.atomic
def delete_pool(pool: Pool) -> None:
    lock_fleet()
    allocated = selectors.allocated_bytes(pool)
    if allocated:
        raise ValidationError(
            f"Pool {pool.name} holds {allocated} bytes of volumes; delete or move them first."
        )
    node, name = pool.node_id, str(pool)
    pool.delete()
    _changed(f"pool {name} deleted", [node])


# --- Volumes ------------------------------------------------------------------------------


def _room_error(pool: Pool, size_bytes: int, free: int | None) -> ValidationError:
    if free is None:
        text = (
            f"Pool {pool.name} on node {pool.node.hostname} has not reported its capacity yet; "
            "give it capacity_bytes or wait for its agent."
        )
    else:
        text = (
            f"Pool {pool.name} on node {pool.node.hostname} has {free} bytes free; "
            f"{size_bytes} bytes do not fit."
        )
    return ValidationError({"size_bytes": [text]})


def _choose_pool(tenant: Any, size_bytes: int) -> Pool:
    """The pool with the most room on a node the tenant may use (its own or the shared fleet)
    that takes new work: a volume on a drained or silent node could not be set up or used."""
    candidates, passed_over = [], {}
    for pool in (
        selectors.pools_with_allocation()
        .filter(Q(node__tenant__isnull=True) | Q(node__tenant=tenant))
        .order_by("node__hostname", "name")
    ):
        refusal = inventory_selectors.not_taking_work(pool.node)
        if refusal is not None:
            passed_over[pool.node_id] = refusal
        elif (free := _free(pool)) is not None:
            candidates.append((free, pool))
    if not candidates:
        text = "No storage pool with a known capacity is available to this tenant."
        if passed_over:
            text += (
                f" Pools on these nodes take no new volumes: {'; '.join(passed_over.values())}. "
                "Bring a node back (or out of maintenance), or add a pool on a ready node."
            )
        raise ValidationError({"size_bytes": [text]})
    free, pool = max(candidates, key=lambda c: c[0])
    if free < size_bytes:
        raise ValidationError(
            {
                "size_bytes": [
                    f"No storage pool has room for {size_bytes} bytes; the most free is pool {pool.name} "
                    f"on node {pool.node.hostname} with {free} bytes."
                ]
            }
        )
    return pool


def _check_node_takes_work(pool: Pool) -> None:
    """A named pool must be on a node that takes new work, like an automatically chosen one."""
    refusal = inventory_selectors.not_taking_work(Node.objects.get(pk=pool.node_id))
    if refusal is not None:
        raise ValidationError(
            {
                "pool": [
                    f"Pool {pool.name} takes no new volumes: {refusal}. Choose a pool on a ready "
                    "node, or leave pool out to place the volume where there is room."
                ]
            }
        )


def _free(pool: Any) -> int | None:
    """Room left in a pool annotated by `pools_with_allocation`."""
    capacity = pool.known_capacity_bytes
    return None if capacity is None else max(0, capacity - pool.allocated_bytes)


@transaction.atomic
def create_volume(
    *,
    tenant: Any,
    name: str,
    size_bytes: int,
    pool: Pool | None = None,
    qos_policy: QosPolicy | None = None,
    read_probe_per_s: int = 0,
) -> Volume:
    """Place a new volume: in `pool` if named and it has room, else where there is most room."""
    lock_fleet()
    if pool is None:
        pool = _choose_pool(tenant, size_bytes)
    else:
        _check_node_takes_work(pool)
        free = selectors.free_bytes(pool)
        if free is None or free < size_bytes:
            raise _room_error(pool, size_bytes, free)
    volume = core.create(
        Volume,
        tenant=tenant,
        name=name,
        size_bytes=size_bytes,
        pool=pool,
        qos_policy=qos_policy,
        read_probe_per_s=read_probe_per_s,
    )
    _changed(f"volume {name} created", [pool.node_id])
    return volume


@transaction.atomic
def update_volume(volume: Volume, **changes: Any) -> Volume:
    """Rename, grow, or change QoS; volumes never shrink (the data would not fit)."""
    lock_fleet()
    size = changes.get("size_bytes", volume.size_bytes)
    if size < volume.size_bytes:
        raise ValidationError(
            {
                "size_bytes": [
                    f"Volumes never shrink: {volume.name} holds {volume.size_bytes} bytes."
                ]
            }
        )
    if size > volume.size_bytes:
        free = selectors.free_bytes(volume.pool)
        if free is None or free < size - volume.size_bytes:
            raise _room_error(volume.pool, size - volume.size_bytes, free)
    core.update(volume, **changes)
    _changed(f"volume {volume.name} changed", [volume.pool.node_id])
    return volume


@transaction.atomic
def delete_volume(volume: Volume) -> None:
    node, name = volume.pool.node_id, volume.name
    volume.delete()
    _changed(f"volume {name} deleted", [node])


# --- QoS policies -------------------------------------------------------------------------


def create_qos_policy(**fields: Any) -> QosPolicy:
    return core.create(QosPolicy, **fields)


@transaction.atomic
def update_qos_policy(policy: QosPolicy, **changes: Any) -> QosPolicy:
    core.update(policy, **changes)
    nodes = set(policy.volumes.values_list("pool__node_id", flat=True))
    _changed(f"storage QoS policy {policy.name} changed", nodes)
    return policy


def delete_qos_policy(policy: QosPolicy) -> None:
    used = policy.volumes.count()
    if used:
        raise ValidationError(
            f"Storage QoS policy {policy.name} is attached to {used} volume(s); detach it first."
        )
    policy.delete()


# --- Exports ------------------------------------------------------------------------------


@transaction.atomic
def create_export(**fields: Any) -> Export:
    export = core.create(Export, **fields)
    _changed(
        f"export of tenant {export.tenant_id} created", selectors.nodes_holding(export.tenant_id)
    )
    return export


@transaction.atomic
def update_export(export: Export, **changes: Any) -> Export:
    core.update(export, **changes)
    _changed(
        f"export of tenant {export.tenant_id} changed", selectors.nodes_holding(export.tenant_id)
    )
    return export


@transaction.atomic
def delete_export(export: Export) -> None:
    tenant = export.tenant_id
    export.delete()
    _changed(f"export of tenant {tenant} deleted", selectors.nodes_holding(tenant))


# --- Artifacts ----------------------------------------------------------------------------


@transaction.atomic
def create_artifact(
    *, tenant: Any, name: str, file: UploadedFile, sha256: str | None = None
) -> Artifact:
    """Keep an upload as an artifact; its sha256 (computed while it streamed in) is the truth.

    `sha256`, when the client sends one, must match it: a mismatch means the bytes changed
    on the way (or are the wrong file), and nothing is kept.
    """
    actual = file.sha256  # type: ignore[attr-defined]
    if sha256 is not None and sha256 != actual:
        raise ValidationError(
            {
                "sha256": [
                    f"The upload's sha256 is {actual}, not {sha256}: it was corrupted on the way or is "
                    "not the file you meant; upload it again."
                ]
            }
        )
    try:
        contents = inspect_archive(file.temporary_file_path())
    except ValueError as exc:
        raise ValidationError({"file": [str(exc)]}) from None
    artifact = Artifact(
        tenant=tenant,
        name=name,
        sha256=actual,
        size_bytes=file.size,
        unpacked_bytes=contents.unpacked_bytes,
        files=contents.files,
    )
    artifact.full_clean()
    artifact.save()
    artifact_dir().mkdir(parents=True, exist_ok=True)
    os.replace(file.temporary_file_path(), artifact.path)  # last: the commit is all that follows
    return artifact


@transaction.atomic
def delete_artifact(artifact: Artifact) -> None:
    names = list(artifact.deployments.values_list("name", flat=True))
    if names:
        raise ValidationError(
            f"Artifact {artifact.name} is used by deployment(s) {', '.join(names)}."
        )
    path = artifact.path
    artifact.delete()
    transaction.on_commit(lambda: path.unlink(missing_ok=True))


# --- Reports from agents ------------------------------------------------------------------


@transaction.atomic
def record_storage_report(node: Node, report: StorageReport) -> None:
    """Store pool capacity, per-volume I/O and export endpoints as the node's engine has them.

    A pool whose capacity changed re-plans the fleet: model volumes may fit now, or not.
    """
    usage = {p.name: p for p in report.pools}
    io: dict[str, dict[str, dict[str, float]]] = {}
    for volume in report.volumes:
        io.setdefault(volume.pool, {})[volume.name] = volume.model_dump(exclude={"name", "pool"})
    resized = []
    for pool in Pool.objects.select_for_update().filter(node=node):
        reported = usage.get(pool.name)
        capacity = reported.capacity_bytes if reported else None
        if capacity != pool.reported_capacity_bytes:
            resized.append(pool.name)
        pool.reported_capacity_bytes = capacity
        pool.reported_free_bytes = reported.free_bytes if reported else None
        pool.volume_io = io.get(pool.name, {})
        pool.reported_at = report.reported_at
        pool.save(
            update_fields=[
                "reported_capacity_bytes",
                "reported_free_bytes",
                "volume_io",
                "reported_at",
                "updated_at",
            ]
        )
    endpoints = {e.tenant_id: e for e in report.exports}
    for export in Export.objects.select_for_update().filter(
        Q(tenant_id__in=list(endpoints)) | Q(endpoints__icontains=str(node.pk))
    ):
        mine = endpoints.get(export.tenant_id)
        export.endpoints = [e for e in export.endpoints if e["node"] != str(node.pk)] + (
            [
                {
                    "node": str(node.pk),
                    "hostname": node.hostname,
                    "nqn": mine.nqn,
                    "transport": mine.transport,
                    "address": str(mine.address),
                    "port": mine.port,
                }
            ]
            if mine
            else []
        )
        export.save(update_fields=["endpoints", "updated_at"])
    if resized:
        _changed(f"capacity of pool(s) {', '.join(resized)} on {node.hostname} reported", [])

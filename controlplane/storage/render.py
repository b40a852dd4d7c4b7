"""Each node's storage components of its desired state: pools, volumes, exports and QoS.

Tenants' volumes come from their rows, model volumes from the placed replicas; a tenant's
export covers its volumes in SPDK pools (the local engine has no NVMe-oF).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any
from uuid import UUID

from agent.protocol import ExportSpec, PoolSpec, QosSpec, VolumeSpec
from controlplane.storage.choices import PoolKind
from controlplane.storage.models import Export, Pool, Volume


def render_storage(nodes: list[Any], replicas: list[Any]) -> dict[UUID, dict[str, list[Any]]]:
    """Keyword arguments for each node's `Components`; `replicas` come with deployment and pool."""
    pools: dict[UUID, list[PoolSpec]] = defaultdict(list)
    for pool in Pool.objects.filter(node__in=nodes).order_by("name"):
        pools[pool.node_id].append(pool.spec())
    volumes: dict[UUID, list[tuple[VolumeSpec, str]]] = defaultdict(list)
    qos: dict[UUID, list[QosSpec]] = defaultdict(list)
    for volume in Volume.objects.filter(pool__node__in=nodes).select_related("pool", "qos_policy"):
        node = volume.pool.node_id
        volumes[node].append(
            (
                VolumeSpec(
                    name=volume.wire_name,
                    tenant_id=volume.tenant_id,
                    pool=volume.pool.name,
                    size_bytes=volume.size_bytes,
                ),
                volume.pool.kind,
            )
        )
        if (policy := volume.qos_policy) is not None:
            qos[node].append(
                QosSpec(
                    volume=volume.wire_name,
                    rw_ios_per_sec=policy.rw_ios_per_sec,
                    rw_mbytes_per_sec=policy.rw_mbytes_per_sec,
                    r_mbytes_per_sec=policy.r_mbytes_per_sec,
                    w_mbytes_per_sec=policy.w_mbytes_per_sec,
                )
            )
    for replica in replicas:
        if replica.pool is not None:
            d = replica.deployment
            volumes[replica.node_id].append(
                (
                    VolumeSpec(
                        name=replica.volume_name,
                        tenant_id=d.tenant_id,
                        pool=replica.pool.name,
                        size_bytes=d.model_volume_bytes,
                    ),
                    replica.pool.kind,
                )
            )
    tenants = {spec.tenant_id for placed in volumes.values() for spec, _ in placed}
    exports = {e.tenant_id: e for e in Export.objects.filter(tenant_id__in=tenants)}
    rendered = {}
    for node in nodes:
        placed = sorted(volumes[node.pk], key=lambda v: v[0].name)
        rendered[node.pk] = {
            "pools": pools[node.pk],
            "volumes": [spec for spec, _ in placed],
            "exports": [
                ExportSpec(
                    volume=spec.name,
                    tenant_id=spec.tenant_id,
                    nqn=export.nqn,
                    hosts=sorted(export.hosts),
                )
                for spec, kind in placed
                if kind == PoolKind.SPDK and (export := exports.get(spec.tenant_id)) is not None
            ],
            "qos": sorted(qos[node.pk], key=lambda q: q.volume),
        }
    return rendered

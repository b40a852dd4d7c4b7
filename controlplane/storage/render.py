"""Each node's storage components of its desired state: pools, volumes, exports and QoS.

Tenants' volumes come from their rows, model volumes from the placed replicas; a tenant's
export covers its volumes in SPDK pools (the local engine has no NVMe-oF).

A tenant's policy may cap storage too (`storage_iops`, `storage_mb_s`). Each of its
volumes then gets, field by field, the stricter of that cap and its own QoS policy's
(`rw_ios_per_sec`, `rw_mbytes_per_sec`; the read-only and write-only MiB/s come from the
QoS policy alone). The caps hold per volume, as SPDK's QoS does, and apply to the
tenant's own volumes, not to model volumes, which only stage and load a deployment's
weights.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any
from uuid import UUID

from django.db.models import Q

from agent.protocol import ExportSpec, PoolSpec, QosSpec, VolumeSpec
from controlplane.storage.choices import PoolKind
from controlplane.storage.models import Export, Pool, QosPolicy, Volume
from controlplane.tenancy.models import TenantPolicy


def _stricter(limit: int, cap: int | None) -> int:
    """The stricter of a QoS limit (0: unlimited) and a tenant's cap (None: unlimited)."""
    if cap is None:
        return limit
    return cap if limit == 0 else min(limit, cap)


def _qos(volume: Volume, policy: QosPolicy | None, caps: TenantPolicy | None) -> QosSpec | None:
    """The volume's limits, or None when neither its QoS policy nor its tenant limits it."""
    if policy is None and caps is None:
        return None
    return QosSpec(
        volume=volume.wire_name,
        rw_ios_per_sec=_stricter(
            policy.rw_ios_per_sec if policy else 0, caps and caps.storage_iops
        ),
        rw_mbytes_per_sec=_stricter(
            policy.rw_mbytes_per_sec if policy else 0, caps and caps.storage_mb_s
        ),
        r_mbytes_per_sec=policy.r_mbytes_per_sec if policy else 0,
        w_mbytes_per_sec=policy.w_mbytes_per_sec if policy else 0,
    )


def render_storage(nodes: list[Any], replicas: list[Any]) -> dict[UUID, dict[str, list[Any]]]:
    """Keyword arguments for each node's `Components`; `replicas` come with deployment and pool."""
    pools: dict[UUID, list[PoolSpec]] = defaultdict(list)
    for pool in Pool.objects.filter(node__in=nodes).order_by("name"):
        pools[pool.node_id].append(pool.spec())
    volumes: dict[UUID, list[tuple[VolumeSpec, str]]] = defaultdict(list)
    qos: dict[UUID, list[QosSpec]] = defaultdict(list)
    tenant_volumes = list(
        Volume.objects.filter(pool__node__in=nodes).select_related("pool", "qos_policy")
    )
    caps = {
        p.tenant_id: p
        for p in TenantPolicy.objects.filter(
            Q(storage_iops__isnull=False) | Q(storage_mb_s__isnull=False),
            tenant_id__in={v.tenant_id for v in tenant_volumes},
        )
    }
    for volume in tenant_volumes:
        node = volume.pool.node_id
        volumes[node].append(
            (
                VolumeSpec(
                    name=volume.wire_name,
                    tenant_id=volume.tenant_id,
                    pool=volume.pool.name,
                    size_bytes=volume.size_bytes,
                    read_probe_per_s=volume.read_probe_per_s,
                ),
                volume.pool.kind,
            )
        )
        if (spec := _qos(volume, volume.qos_policy, caps.get(volume.tenant_id))) is not None:
            qos[node].append(spec)
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

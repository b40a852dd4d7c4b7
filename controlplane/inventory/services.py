"""Mutations of nodes: operators' edits, and what agents report (enrollment, inventory, liveness)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import CharField, Model
from django.utils import timezone

from agent.protocol import Enrollment, Heartbeat, Inventory
from controlplane.core import services as core
from controlplane.core.secrets import Issued, digest, new_secret
from controlplane.inventory import signals
from controlplane.inventory.choices import NodeStatus
from controlplane.inventory.models import BootstrapToken, Drive, Gpu, Nic, Node, NumaNode

OPERATOR_FIELDS = frozenset({"labels", "maintenance", "maintenance_reason", "tenant"})
BOOTSTRAP_PREFIX = "tgb_"
CREDENTIAL_PREFIX = "tgn_"


class EnrollmentRefused(Exception):
    """The bootstrap token is unknown, used or expired; the agent must get a new one."""


PLACEMENT_FIELDS = ("labels", "maintenance", "tenant_id")


def _replace_after_commit(node_ids: list[Any], why: str) -> None:
    """Re-place the replicas of nodes that were lost, drained or changed, once committed."""
    transaction.on_commit(
        lambda: signals.nodes_changed.send(sender=Node, node_ids=node_ids, why=why)
    )


@transaction.atomic
def update_node(node: Node, **changes: Any) -> Node:
    """Apply operator edits; leaving maintenance clears its reason. A drain, a return from
    maintenance, new labels or a new dedication re-place replicas after commit."""
    unknown = set(changes) - OPERATOR_FIELDS
    assert not unknown, f"update_node() changes only operator fields, not {sorted(unknown)}"
    if not changes.get("maintenance", node.maintenance):
        changes["maintenance_reason"] = ""
    was_drained = node.maintenance
    before = [getattr(node, name) for name in PLACEMENT_FIELDS]
    core.update(node, **changes)
    if [getattr(node, name) for name in PLACEMENT_FIELDS] != before:
        if node.maintenance != was_drained:
            why = "node drained" if node.maintenance else "node back from maintenance"
        else:
            why = "node labels or dedication changed"
        _replace_after_commit([node.pk], why)
    return node


def create_bootstrap_token(
    *,
    name: str,
    created_by: Any = None,
    tenant: Any = None,
    ttl_s: int | None = None,
    uses: int = 1,
) -> Issued:
    secret = new_secret(BOOTSTRAP_PREFIX)
    expires = timezone.now() + timedelta(seconds=ttl_s or settings.BOOTSTRAP_TOKEN_TTL_S)
    token = BootstrapToken.objects.create(
        name=name,
        prefix=secret[:11],
        digest=digest(secret),
        expires_at=expires,
        tenant=tenant,
        created_by=created_by,
        uses_left=uses,
    )
    return Issued(token, secret)


def revoke_bootstrap_token(token: BootstrapToken) -> None:
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at", "updated_at"])


@transaction.atomic
def enroll(message: Enrollment) -> tuple[Node, str]:
    """Trade a bootstrap token for a node and its credential (shown once).

    A host that enrolls again (reinstalled agent) keeps its node and gets a new
    credential; the old one stops working.
    """
    token = (
        BootstrapToken.objects.select_for_update()
        .filter(digest=digest(message.bootstrap_token), uses_left__gt=0, revoked_at__isnull=True)
        .first()
    )
    now = timezone.now()
    if token is None or token.expires_at <= now:
        raise EnrollmentRefused("the bootstrap token is unknown, already used, revoked or expired")
    node, _ = Node.objects.get_or_create(
        hostname=message.hostname, defaults={"tenant": token.tenant}
    )
    credential = new_secret(CREDENTIAL_PREFIX)
    node.credential_digest = digest(credential)
    node.agent_version = message.agent_version
    _set_host_facts(node, message.host)
    node.save()
    token.used_at, token.node, token.uses_left = now, node, token.uses_left - 1
    token.save(update_fields=["used_at", "node", "uses_left", "updated_at"])
    return node, credential


def authenticate_node(credential: str) -> Node | None:
    return Node.objects.filter(credential_digest=digest(credential)).first()


def _set_host_facts(node: Node, host: Any) -> None:
    node.kernel, node.os, node.cpu_model = host.kernel, host.os, host.cpu_model
    node.cpu_count, node.memory_total_bytes = host.cpu_count, host.memory_bytes


def _rows(model: type[Model], node: Node, facts: Any) -> list[Model]:
    """Hardware rows from discovered facts: same-named fields, absent text as ""."""
    fields = {f.name: f for f in model._meta.concrete_fields}
    rows = []
    for fact in facts:
        values = {k: v for k, v in fact.model_dump().items() if k in fields}
        for name, value in values.items():
            if value is None and isinstance(fields[name], CharField):
                values[name] = ""
        rows.append(model(node=node, **values))
    return rows


def _gpu_signature(gpus: Any) -> list[tuple[Any, ...]]:
    return sorted((g.index, g.uuid, g.name, g.memory_total_bytes, g.numa_node) for g in gpus)


@transaction.atomic
def record_inventory(node: Node, inventory: Inventory) -> None:
    """Replace the node's hardware rows with what the agent just discovered.

    Different GPUs can change placement, so they re-plan the fleet.
    """
    gpus_before = _gpu_signature(node.gpus.all())
    _set_host_facts(node, inventory.host)
    node.save()
    for model in (NumaNode, Gpu, Nic, Drive):
        model.objects.filter(node=node).delete()
    for model, facts in (
        (NumaNode, inventory.numa),
        (Gpu, inventory.gpus),
        (Nic, inventory.nics),
        (Drive, inventory.drives),
    ):
        model.objects.bulk_create(_rows(model, node, facts))
    if _gpu_signature(inventory.gpus) != gpus_before:
        signals.node_capacity_changed.send(
            sender=Node, node=node, cause=f"hardware of {node.hostname} changed"
        )


def record_heartbeat(node: Node, heartbeat: Heartbeat) -> None:
    """A node that is heard is ready again, whatever it was; becoming ready may place work."""
    Node.objects.filter(pk=node.pk).update(
        status=NodeStatus.READY,
        last_heartbeat_at=timezone.now(),
        agent_version=heartbeat.agent_version,
    )
    if node.status != NodeStatus.READY:  # as loaded when the request was authenticated
        signals.node_capacity_changed.send(
            sender=Node, node=node, cause=f"node {node.hostname} ready"
        )


@transaction.atomic
def mark_silent_nodes_unreachable() -> int:
    """Nodes not heard for NODE_UNREACHABLE_AFTER_S turn unreachable; their replicas are
    re-placed after commit where other nodes have room."""
    cutoff = timezone.now() - timedelta(seconds=settings.NODE_UNREACHABLE_AFTER_S)
    silent = Node.objects.filter(status=NodeStatus.READY, last_heartbeat_at__lt=cutoff)
    node_ids = list(silent.values_list("pk", flat=True))
    # The same conditions again: a heartbeat that landed in between keeps its node ready.
    marked = silent.filter(pk__in=node_ids).update(
        status=NodeStatus.UNREACHABLE, updated_at=timezone.now()
    )
    if marked:
        _replace_after_commit(node_ids, "node unreachable")
    return marked

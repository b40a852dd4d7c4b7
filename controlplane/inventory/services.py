"""Mutations of nodes: operators' edits, and what agents report (enrollment, inventory, liveness)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import CharField, Model
from django.utils import timezone

from agent.protocol import Enrollment, Heartbeat, Inventory
from controlplane.core import services as core
from controlplane.core.secrets import Issued, digest, new_secret
from controlplane.inventory import signals
from controlplane.inventory.choices import NodeStatus
from controlplane.inventory.models import (
    AgentReport,
    BootstrapToken,
    Drive,
    Gpu,
    Nic,
    Node,
    NumaNode,
)

OPERATOR_FIELDS = frozenset({"labels", "maintenance", "maintenance_reason", "tenant", "gateway"})
BOOTSTRAP_PREFIX = "tgb_"
CREDENTIAL_PREFIX = "tgn_"


class EnrollmentRefused(Exception):
    """The bootstrap token is unknown, used or expired; the agent must get a new one."""


PLACEMENT_FIELDS = ("labels", "maintenance", "tenant_id")
RENDERED_FIELDS = ("gateway",)
"""Operator fields that change what the node runs, not where replicas go."""


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
    before = [getattr(node, name) for name in (*PLACEMENT_FIELDS, *RENDERED_FIELDS)]
    core.update(node, **changes)
    after = [getattr(node, name) for name in (*PLACEMENT_FIELDS, *RENDERED_FIELDS)]
    if after != before:
        if node.maintenance != was_drained:
            why = "node drained" if node.maintenance else "node back from maintenance"
        elif after[: len(PLACEMENT_FIELDS)] != before[: len(PLACEMENT_FIELDS)]:
            why = "node labels or dedication changed"
        else:
            why = f"gateway turned {'on' if node.gateway else 'off'}"
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


HOST_FIELDS = ("kernel", "os", "cpu_model", "cpu_count", "memory_total_bytes")


@transaction.atomic
def enroll(message: Enrollment) -> tuple[Node, str]:
    """Trade a bootstrap token for a node and its credential (shown once).

    A host that enrolls again (reinstalled agent) keeps its node and gets a new
    credential; the old one stops working. A fixed handful of queries whatever the fleet
    holds (the node is one upsert), so a batch of nodes enrolls at hundreds a minute.
    """
    token = (
        BootstrapToken.objects.select_for_update()
        .filter(digest=digest(message.bootstrap_token), uses_left__gt=0, revoked_at__isnull=True)
        .first()
    )
    now = timezone.now()
    if token is None or token.expires_at <= now:
        raise EnrollmentRefused("the bootstrap token is unknown, already used, revoked or expired")
    credential = new_secret(CREDENTIAL_PREFIX)
    node = Node(
        hostname=message.hostname,
        tenant=token.tenant,
        credential_digest=digest(credential),
        agent_version=message.agent_version,
        created_at=now,
        updated_at=now,
    )
    _set_host_facts(node, message.host)
    (node,) = Node.objects.bulk_create(
        [node],
        update_conflicts=True,
        unique_fields=["hostname"],  # a host enrolling again keeps its node and dedication
        update_fields=["credential_digest", "agent_version", *HOST_FIELDS, "updated_at"],
    )
    token.used_at, token.node, token.uses_left = now, node, token.uses_left - 1
    token.save(update_fields=["used_at", "node", "uses_left", "updated_at"])
    return node, credential


_NODE_BY_CREDENTIAL_SQL = (
    f"SELECT {', '.join(connection.ops.quote_name(f.column) for f in Node._meta.concrete_fields)} "
    f"FROM {connection.ops.quote_name(Node._meta.db_table)} WHERE credential_digest = %s"
)


def authenticate_node(credential: str) -> Node | None:
    """The node holding this credential, or None. Every agent request asks, so it is one
    written-out statement: compiling the ORM's query cost more than running it."""
    found = list(Node.objects.raw(_NODE_BY_CREDENTIAL_SQL, [digest(credential)]))
    return found[0] if found else None


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


def _capacity_changed_after_commit(node: Node, cause: str) -> None:
    """Let placement look at the node once this change is committed: re-planning takes row
    locks in one order (tenants, deployments, nodes), which it could not keep inside a
    transaction that already wrote the node's rows."""
    transaction.on_commit(
        lambda: signals.node_capacity_changed.send(sender=Node, node=node, cause=cause)
    )


@transaction.atomic
def record_inventory(node: Node, inventory: Inventory) -> None:
    """Replace the node's hardware rows with what the agent just discovered.

    An unchanged report (the periodic one, mostly) writes nothing. The node's row is
    written only when its host facts changed. Different GPUs can change placement, so they
    re-plan the fleet after commit.
    """
    host = inventory.host
    facts = dict(
        zip(
            HOST_FIELDS,
            (host.kernel, host.os, host.cpu_model, host.cpu_count, host.memory_bytes),
            strict=True,
        )
    )
    if any(getattr(node, name) != value for name, value in facts.items()):
        Node.objects.filter(pk=node.pk).update(**facts, updated_at=timezone.now())
        for name, value in facts.items():
            setattr(node, name, value)
    rows = {
        model: _rows(model, node, found)
        for model, found in (
            (NumaNode, inventory.numa),
            (Gpu, inventory.gpus),
            (Nic, inventory.nics),
            (Drive, inventory.drives),
        )
    }
    gpus_before: list[tuple[Any, ...]] = []
    for model, made in rows.items():
        stored = list(model.objects.filter(node=node))
        if model is Gpu:
            gpus_before = _gpu_signature(stored)
        if sorted(map(_values, stored)) == sorted(map(_values, made)):
            continue  # unchanged: the periodic report mostly
        if stored:
            model.objects.filter(node=node).delete()
        model.objects.bulk_create(made)
    if _gpu_signature(inventory.gpus) != gpus_before:
        _capacity_changed_after_commit(node, f"hardware of {node.hostname} changed")


def _values(row: Model) -> tuple[str, ...]:
    """A hardware row's facts, comparable between a stored row and a freshly made one."""
    return tuple(
        repr(getattr(row, f.attname))
        for f in row._meta.concrete_fields
        if f.name not in ("id", "node")
    )


_HEARTBEAT_SQL = (
    f"INSERT INTO {AgentReport._meta.db_table} (node_id, last_heartbeat_at, applied_generation) "
    "VALUES (%s, %s, 0) "
    "ON CONFLICT (node_id) DO UPDATE SET last_heartbeat_at = EXCLUDED.last_heartbeat_at"
)


_HEARD_AT = AgentReport._meta.get_field("last_heartbeat_at")


def record_heartbeat(node: Node, heartbeat: Heartbeat) -> None:
    """One upsert of the node's report, which no planner locks, so heartbeats never wait
    behind planning. The node's row is written only when its status or agent version
    changes; a node that is heard is ready again, whatever it was, and becoming ready may
    place work (after commit, in its own transaction)."""
    with connection.cursor() as cursor:  # one statement: no transaction, no ORM to compile
        cursor.execute(
            _HEARTBEAT_SQL,
            [
                AgentReport._meta.pk.get_db_prep_value(node.pk, connection),
                _HEARD_AT.get_db_prep_value(timezone.now(), connection),
            ],
        )
    _heard_from(node, heartbeat)


def record_heartbeats(heartbeats: Iterable[Heartbeat]) -> None:
    """Heartbeats of several nodes at once (those that came over the telemetry WebSocket):
    one upsert for all their reports and one read of their nodes; a node's row is written
    only when its status or agent version changes, as for one heartbeat."""
    latest: dict[Any, Heartbeat] = {}
    for heartbeat in heartbeats:
        latest[heartbeat.node_id] = heartbeat
    if not latest:
        return
    record_heard(latest)
    for node in Node.objects.filter(pk__in=latest).only(
        "pk", "hostname", "status", "agent_version"
    ):
        _heard_from(node, latest[node.pk])


def _heard_from(node: Node, heartbeat: Heartbeat) -> None:
    """A heartbeat makes its node ready, whatever it was, with the version it names."""
    if node.status == NodeStatus.READY and node.agent_version == heartbeat.agent_version:
        return
    changed = Node.objects.filter(pk=node.pk).exclude(
        status=NodeStatus.READY, agent_version=heartbeat.agent_version
    )
    changed.update(
        status=NodeStatus.READY, agent_version=heartbeat.agent_version, updated_at=timezone.now()
    )
    if node.status != NodeStatus.READY:  # as loaded when the request was authenticated
        _capacity_changed_after_commit(node, f"node {node.hostname} ready")


def record_heard(node_ids: Iterable[Any]) -> None:
    """These nodes' agents were just heard another way (their telemetry stream): counted as
    heartbeats, one statement for all of them, so a web process busy ingesting, which
    answers heartbeat requests late, never lets a node that streams look silent."""
    now = timezone.now()
    AgentReport.objects.bulk_create(
        [AgentReport(node_id=pk, last_heartbeat_at=now) for pk in sorted(node_ids)],
        update_conflicts=True,  # rows in key order: concurrent flushes never wait crosswise
        unique_fields=["node"],
        update_fields=["last_heartbeat_at"],
    )


def record_applied_generation(node: Node, generation: int, gateway_url: str = "") -> None:
    """The agent applied `generation`, which left its gateway answering at `gateway_url`
    (empty: none): one update of its report, never its node's row, and never backwards."""
    raised = AgentReport.objects.filter(node_id=node.pk, applied_generation__lte=generation)
    if not raised.update(applied_generation=generation, gateway_url=gateway_url):
        AgentReport.objects.bulk_create(
            [AgentReport(node_id=node.pk, applied_generation=generation, gateway_url=gateway_url)],
            ignore_conflicts=True,
        )


@transaction.atomic(savepoint=False)
def record_applied_generations(applied: Iterable[tuple[Node, int, str]]) -> None:
    """Several agents applied generations (node, generation, gateway URL), each recorded as
    `record_applied_generation` records one: one locked read and one update of their
    reports for all, and never backwards."""
    newest: dict[Any, tuple[int, str]] = {}
    for node, generation, gateway_url in applied:
        if node.pk not in newest or newest[node.pk][0] <= generation:
            newest[node.pk] = (generation, gateway_url)
    if not newest:
        return
    reports = (
        AgentReport.objects.select_for_update(no_key=True)
        .filter(node__in=newest)
        .only("node_id", "applied_generation", "gateway_url")
        .order_by("pk")  # in key order, as heartbeats' upserts take them
    )
    raised = []
    for report in reports:
        generation, gateway_url = newest.pop(report.node_id)
        if report.applied_generation <= generation:
            report.applied_generation, report.gateway_url = generation, gateway_url
            raised.append(report)
    core.update_each(raised, ["applied_generation", "gateway_url"])
    AgentReport.objects.bulk_create(
        [
            AgentReport(node_id=pk, applied_generation=generation, gateway_url=gateway_url)
            for pk, (generation, gateway_url) in newest.items()
        ],
        ignore_conflicts=True,
    )


@transaction.atomic
def mark_silent_nodes_unreachable() -> int:
    """Nodes not heard for NODE_UNREACHABLE_AFTER_S turn unreachable; their replicas are
    re-placed after commit where other nodes have room."""
    cutoff = timezone.now() - timedelta(seconds=settings.NODE_UNREACHABLE_AFTER_S)
    silent = Node.objects.filter(status=NodeStatus.READY, report__last_heartbeat_at__lt=cutoff)
    node_ids = list(silent.values_list("pk", flat=True))
    # The same conditions again: a heartbeat that landed in between keeps its node ready.
    marked = silent.filter(pk__in=node_ids).update(
        status=NodeStatus.UNREACHABLE, updated_at=timezone.now()
    )
    if marked:
        _replace_after_commit(node_ids, "node unreachable")
    return marked

"""All fleet mutations: deployments, placement, revisions, rollout reports.

Every change that can alter what a node should run ends in `reconcile_fleet`, which
re-plans only what the change can affect (its deployments, the nodes they may use, the
tenant's quota) under row locks, so changes elsewhere in the fleet plan at the same time;
then it renders each affected node's desired state, stores a new signed revision where
the content changed, and pushes it to the node's queue after commit. A change reaching
many nodes commits its plan and answers first; a Celery task renders, signs and pushes
their revisions in bulk.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import partial
from typing import Any
from uuid import UUID

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Max, OuterRef, Q, Subquery
from django.urls import reverse
from django.utils import timezone
from kombu.exceptions import OperationalError

from agent.protocol import (
    AppliedStatus,
    ArtifactRef,
    Components,
    DesiredState,
    GatewaySpec,
    PeerDeployment,
    PeerReplica,
    WorkerSpec,
    queue_name,
    sign_state,
    state_tag,
)
from controlplane.celery import app as celery_app
from controlplane.core import services as core
from controlplane.core.locks import lock_fleet
from controlplane.core.secrets import derived_secret, digest
from controlplane.core.signing import private_key
from controlplane.fleet import hooks, placement
from controlplane.fleet import selectors as fleet_selectors
from controlplane.fleet.choices import RevisionStatus
from controlplane.fleet.models import Deployment, Replica, Revision
from controlplane.inventory import services as inventory_services
from controlplane.inventory.choices import NodeStatus
from controlplane.inventory.models import Drive, Gpu, Nic, Node
from controlplane.storage import selectors as storage_selectors
from controlplane.storage.render import render_storage
from controlplane.tenancy import selectors as tenancy_selectors
from controlplane.tenancy.models import InferenceKey, Tenant

log = logging.getLogger(__name__)

APPLY_TASK = "agent.apply_revision"


# --- Deployments ------------------------------------------------------------------------


@transaction.atomic
def create_deployment(**fields: Any) -> Deployment:
    """`shared_with` (tenants) may come along; see `share_deployment`."""
    shared_with = fields.pop("shared_with", ())
    _lock_tenant(
        fields["tenant"].pk if "tenant" in fields else fields["tenant_id"],
        volume=bool(fields.get("artifact") or fields.get("artifact_id")),
    )
    deployment = core.create(Deployment, **fields)
    _set_shares(deployment, shared_with)
    reconcile_fleet(cause=f"deployment {deployment.name} created", touched=[deployment.pk])
    return deployment


RENDERED_FIELDS = frozenset(
    {
        "runtime_options",
        "max_batch_size",
        "max_tokens_per_step",
        "max_queue_delay_ms",
        "max_queue_len",
        "tpot_steps",
    }
)
"""Deployment fields that change what its workers are told, never where they run: a
change of only these renders the nodes holding its replicas without re-planning."""


@transaction.atomic
def update_deployment(deployment: Deployment, **changes: Any) -> Deployment:
    """Change a deployment and roll it out. A change of only `RENDERED_FIELDS` (batch
    sizes, queue limits, runtime options) moves nothing, so it skips planning, which
    would read and weigh every node its replicas could use: it renders the nodes that
    hold them."""
    shared_with = changes.pop("shared_with", None)
    changed = {name for name, value in changes.items() if getattr(deployment, name) != value}
    if changed <= RENDERED_FIELDS and shared_with is None:
        core.update(deployment, **changes)  # the row stays locked until commit
        nodes = set(deployment.instances.exclude(node=None).values_list("node_id", flat=True))
        _render(nodes, cause=f"deployment {deployment.name} changed")
        return deployment
    _lock_tenant(
        deployment.tenant_id, volume=bool(deployment.artifact_id or changes.get("artifact"))
    )
    core.update(deployment, **changes)
    if shared_with is not None:
        _set_shares(deployment, shared_with)
    reconcile_fleet(cause=f"deployment {deployment.name} changed", touched=[deployment.pk])
    return deployment


@transaction.atomic
def share_deployment(deployment: Deployment, tenants: Iterable[Tenant]) -> Deployment:
    """Make the deployment's workers serve exactly these other tenants besides its own.

    Each of them sends requests with its own inference keys and is scheduled under its
    own tenant policy; the rollout carries their keys and policies to the workers.
    """
    _lock_tenant(deployment.tenant_id)
    if _set_shares(deployment, tenants):
        reconcile_fleet(
            cause=f"sharing of deployment {deployment.name} changed", touched=[deployment.pk]
        )
    return deployment


def _set_shares(deployment: Deployment, tenants: Iterable[Tenant]) -> bool:
    """Store the sharers; False when they were already these. Refuses the owner itself, an
    inactive tenant, and dropping a tenant an unshare check objects to (one whose SLOs still
    measure the deployment)."""
    wanted = {tenant.pk: tenant for tenant in tenants}
    problems = []
    if deployment.tenant_id in wanted:
        problems.append("A deployment always serves its own tenant; list only other tenants.")
    problems += [f"Tenant {t.slug} is inactive." for t in wanted.values() if not t.is_active]
    current = set(deployment.shared_with.values_list("pk", flat=True))
    dropped = current - set(wanted)
    if dropped:
        problems += [p for check in hooks.unshare_checks for p in check(deployment, dropped)]
    if problems:
        raise ValidationError({"shared_with": problems})
    if current == set(wanted):
        return False
    deployment.shared_with.set(wanted.values())
    return True


@transaction.atomic
def delete_deployment(deployment: Deployment) -> None:
    _lock_tenant(deployment.tenant_id)
    nodes = set(deployment.instances.exclude(node=None).values_list("node_id", flat=True))
    name = deployment.name
    deployment.delete()
    reconcile_fleet(cause=f"deployment {name} deleted", nodes=nodes)


# --- Node loss and drains ---------------------------------------------------------------


def replace_from_nodes(node_ids: Iterable[UUID], *, why: str) -> list[Revision]:
    """Re-place replicas after nodes were lost, drained or came back; run after commit.

    Idempotent, like every plan: a second call with nothing changed issues nothing, and
    replicas that already moved stay where they are when their old node returns.
    """
    node_ids = list(node_ids)
    hostnames = sorted(Node.objects.filter(pk__in=node_ids).values_list("hostname", flat=True))
    return reconcile_fleet(cause=f"{why}: {', '.join(hostnames)}", nodes=node_ids)


# --- Planning and rendering -------------------------------------------------------------

INLINE_RENDER_NODES = 16
"""A change reaching at most this many nodes renders their revisions in its own
transaction, so its caller reads them at once; a larger one commits its plan and leaves
rendering, signing and pushing to the `fleet.issue_revisions` task, so the API answers in
about the same time for any fleet size."""

RENDER_TASK = "fleet.issue_revisions"

_WAITING = Q(node__isnull=True) | ~Q(node__status=NodeStatus.READY) | Q(node__maintenance=True)
"""Replicas that a change elsewhere may let move: unplaced, or kept on a node that cannot
run them."""

_CAPPED = Q(max_gpus__isnull=False) | Q(max_replicas__isnull=False)


def reconcile_if_work_waits(node: Node, *, cause: str) -> None:
    """Re-plan after a node came up or changed, unless nothing could move because of it.

    Only unplaced replicas, the node's own, and replicas kept on nodes that are not ready
    can be placed differently; with none of those, a re-plan per enrolling node would make
    enrolling N nodes cost O(N^2).
    """
    if Replica.objects.filter(_WAITING | Q(node=node)).exists():
        reconcile_fleet(cause=cause, nodes=[node.pk])


def _lock(model: Any, pks: Iterable[Any], *, skip_locked: bool = False) -> set[Any]:
    """Lock these rows until the transaction ends (in key order, so two planners never wait
    on each other crosswise); returns the keys locked. With `skip_locked`, rows another
    transaction holds are left out instead of waited for."""
    pks = set(pks)
    if not pks:
        return set()
    return set(
        model.objects.select_for_update(no_key=True, skip_locked=skip_locked, of=("self",))
        .filter(pk__in=pks)
        .order_by("pk")
        .values_list("pk", flat=True)
    )


def _lock_tenant(tenant_id: UUID, *, volume: bool = False) -> None:
    """Serialise a tenant's deployment changes: its quota binds them together. Taken before
    the deployment row, as every planner takes locks in one order: the storage planning
    lock (where model volumes take pool room that volumes placed by storage share), then
    tenants, deployments, nodes."""
    if (
        volume
        or Deployment.objects.filter(tenant_id=tenant_id, model_volume_bytes__isnull=False).exists()
    ):
        lock_fleet()
    _lock(Tenant, [tenant_id])


def _lock_scope(touched: set[UUID], nodes: set[UUID], quotas: set[UUID]) -> set[UUID]:
    """The deployments a change can affect, locked: `touched`, those with replicas on
    `nodes`, those of tenants whose `quotas` changed, each capped tenant's deployments
    whole (its quota counts them all), and waiting replicas' deployments unless another
    planner holds them (it places them itself)."""
    must = set(touched)
    if nodes:
        must |= set(Replica.objects.filter(node__in=nodes).values_list("deployment_id", flat=True))
    waiting = set(Replica.objects.filter(_WAITING).values_list("deployment_id", flat=True))
    if Deployment.objects.filter(
        Q(pk__in=must | waiting) | Q(tenant__in=quotas), model_volume_bytes__isnull=False
    ).exists():
        lock_fleet()
    owners = dict(
        Deployment.objects.filter(pk__in=must | waiting).order_by().values_list("pk", "tenant_id")
    )
    capped = set(
        Tenant.objects.filter(_CAPPED, pk__in=set(owners.values())).values_list("pk", flat=True)
    )
    whole = ({owners[d] for d in must if d in owners} & capped) | quotas
    _lock(Tenant, whole)
    got = _lock(
        Tenant, {owners[d] for d in waiting if d in owners} & capped - whole, skip_locked=True
    )
    must |= set(Deployment.objects.filter(tenant__in=whole).values_list("pk", flat=True))
    waiting = {d for d in waiting if owners.get(d) not in capped or owners[d] in got}
    waiting |= set(Deployment.objects.filter(tenant__in=got).values_list("pk", flat=True))
    return _lock(Deployment, must) | _lock(Deployment, waiting - must, skip_locked=True)


def _rooms(
    scope: set[UUID], nodes: list[Node], *, whole_fleet: bool
) -> dict[UUID, placement.NodeRoom]:
    """Planning rooms for `nodes`, with what replicas outside `scope` hold on them. Hardware
    comes as plain rows: model instances would cost more than the plan. NICs and drives
    only rank new places, so keeping replicas where they are needs none."""
    pools = storage_selectors.model_volume_room()
    hardware: dict[str, dict[UUID, list[Any]]] = defaultdict(lambda: defaultdict(list))
    kinds = [
        ("gpus", Gpu, ("index", "name", "memory_total_bytes", "numa_node", "pci_root"), ["index"])
    ]
    if whole_fleet:
        kinds += [
            ("nics", Nic, ("device", "port", "state", "numa_node", "pci_root"), ["device", "port"]),
            ("drives", Drive, ("name", "numa_node", "pci_root"), ["name"]),
        ]
    for name, model, fields, order in kinds:
        rows = hardware[name]
        for row in (
            model.objects.filter(node__in=nodes)
            .order_by("node_id", *order)
            .values_list("node_id", *fields, named=True)
        ):
            rows[row.node_id].append(row)
    rooms = {
        node.pk: placement.NodeRoom(
            node,
            hardware["gpus"][node.pk],
            pools.get(node.pk, {}),
            nics=hardware["nics"][node.pk],
            drives=hardware["drives"][node.pk],
        )
        for node in nodes
    }
    held = Replica.objects.filter(node__in=list(rooms)).exclude(deployment__in=scope)
    for node_id, deployment_id, gpus, pool, size in held.values_list(
        "node_id", "deployment_id", "gpu_indices", "pool_id", "deployment__model_volume_bytes"
    ):
        rooms[node_id].hold(deployment_id, gpus, pool if size else None, size or 0)
    return rooms


def _plan(
    scope: set[UUID], deployments: list[Deployment], quotas: dict[UUID, placement.Quota]
) -> tuple[list[Replica], dict[UUID, tuple[Any, ...]], list[Replica], list[Replica]]:
    """Plan the scope with only its replicas' nodes; when a replica must be placed or moved,
    lock every node (a planner places only on nodes it holds) and plan with all of them.
    Returns (replicas as loaded, their states before, replicas to save, to delete)."""
    for whole_fleet in (False, True):
        replicas = list(Replica.objects.filter(deployment__in=scope))
        before = {r.pk: _state(r) for r in replicas}  # placement assigns, never mutates
        if whole_fleet:
            _lock(Node, Node.objects.values_list("pk", flat=True))
            rooms = _rooms(scope, list(Node.objects.all()), whole_fleet=True)
        else:
            held = Node.objects.filter(pk__in={r.node_id for r in replicas})
            rooms = _rooms(scope, list(held), whole_fleet=False)
        try:
            to_save, to_delete = placement.plan(
                deployments,
                rooms,
                replicas,
                lambda deployment, index: Replica(deployment=deployment, index=index),
                quotas,
                whole_fleet=whole_fleet,
            )
        except placement.FleetNeeded:
            continue
        return replicas, before, to_save, to_delete
    raise AssertionError("a plan with the whole fleet never needs more")


_STATE = ("node_id", "gpu_indices", "port", "pool_id", "reason", "explanation")


def _state(replica: Replica) -> tuple[Any, ...]:
    return tuple(getattr(replica, name) for name in _STATE)


@transaction.atomic
def reconcile_fleet(
    *,
    cause: str,
    touched: Iterable[UUID] = (),
    nodes: Iterable[UUID] = (),
    tenants: Iterable[UUID] = (),
    quotas: Iterable[UUID] = (),
) -> list[Revision]:
    """Re-plan what a change can affect and issue revisions to every node whose desired
    state changed.

    `touched` deployments, `nodes` and tenants whose `quotas` changed are re-planned (see
    `_lock_scope`); every other replica keeps its place. `tenants` (a revoked key, a new
    policy) change what the nodes serving them render, not where anything runs.
    """
    touched, nodes, tenants = set(touched), set(nodes), set(tenants)
    scope = _lock_scope(touched, nodes, set(quotas))
    deployments = list(Deployment.objects.filter(pk__in=scope))
    quotas_of = {
        tenant.pk: placement.Quota(tenant.slug, tenant.max_gpus, tenant.max_replicas)
        for tenant in Tenant.objects.filter(_CAPPED, pk__in={d.tenant_id for d in deployments})
    }
    replicas, before, to_save, to_delete = _plan(scope, deployments, quotas_of)

    affected = set(nodes)
    for replica in to_delete:
        affected.add(replica.node_id)
    # A replica's address was its node's: one that moved or went is forgotten, and so is
    # it by the other nodes' gateways that reached it. (Only these writes touch `url` here:
    # an agent's report may land while this plans.)
    left = [r for r in to_save if r.pk in before and before[r.pk][0] != r.node_id]
    peered = {r.deployment_id for r in [*to_delete, *left] if r.url}
    affected |= {r.node_id for r in to_save if r.deployment_id in peered}
    Replica.objects.filter(pk__in=[r.pk for r in left]).exclude(url="").update(url="")
    Replica.objects.filter(pk__in=[r.pk for r in to_delete]).delete()
    Replica.objects.bulk_create([r for r in to_save if r.pk not in before])
    Replica.objects.bulk_update(
        [r for r in to_save if r.pk in before and before[r.pk] != _state(r)],
        ["node", "gpu_indices", "port", "pool", "reason", "explanation"],
    )
    for replica in to_save:
        old = before.get(replica.pk)
        moved = old is None or old[:4] != _state(replica)[:4]  # node, GPUs, port, pool
        if old is not None and moved:
            affected.add(old[0])  # the node it left
        if moved or replica.deployment_id in touched:
            affected.add(replica.node_id)
    if tenants:
        affected |= set(
            Replica.objects.filter(
                fleet_selectors.serving(tenants, "deployment"), node__isnull=False
            ).values_list("node_id", flat=True)
        )
    affected.discard(None)
    return _render(affected, cause=cause)


def _render(node_ids: set[UUID], *, cause: str, settle_s: float = 0.0) -> list[Revision]:
    """Issue the nodes' revisions now when they are few; else after commit, in bulk, by the
    `fleet.issue_revisions` task (in this process when the broker cannot take it: the
    change is committed and must still reach its nodes), `settle_s` later: changes that
    come in a burst then find most revisions already issued."""
    if len(node_ids) <= INLINE_RENDER_NODES:
        return render_nodes(node_ids, cause=cause)
    ids = sorted(str(pk) for pk in node_ids)

    def enqueue() -> None:
        try:
            celery_app.send_task(
                RENDER_TASK, args=[ids, cause], countdown=settle_s or None, retry=False
            )
        except OperationalError as exc:
            log.warning("Broker unreachable (%s): rendering %d nodes here.", exc, len(ids))
            render_nodes(ids, cause=cause)

    transaction.on_commit(enqueue)
    return []


@transaction.atomic
def render_nodes(node_ids: Iterable[Any], *, cause: str) -> list[Revision]:
    """Render, sign and store the revisions of these nodes (pinned ones excepted)."""
    locked = _lock(Node, node_ids)
    return issue_revisions(list(Node.objects.filter(pk__in=locked, pinned=False)), cause=cause)


def _artifact(deployment: Deployment) -> ArtifactRef:
    """An uploaded artifact is fetched from the control plane's agent endpoint."""
    if deployment.artifact is None:
        return ArtifactRef(
            uri=deployment.artifact_uri,
            sha256=deployment.artifact_sha256 or None,
            size_bytes=deployment.artifact_size_bytes,
        )
    path = reverse("agent-artifact", args=[deployment.artifact_id])
    return ArtifactRef(
        uri=settings.PUBLIC_URL.rstrip("/") + path,
        sha256=deployment.artifact.sha256,
        size_bytes=deployment.artifact.size_bytes,
    )


def peer_key(deployment_id: UUID) -> str:
    """What a deployment's gateways show its workers on other nodes (which hold its hash
    and answer other hosts only with it); recomputed from SECRET_KEY whenever rendered."""
    return derived_secret("peer-key", str(deployment_id))


def render_components(nodes: list[Node]) -> dict[UUID, Components]:
    """Each node's desired components from placed replicas and volumes (few queries for any N)."""
    replicas = list(
        Replica.objects.filter(node__in=nodes).select_related("deployment__artifact", "pool")
    )
    # Replicas other nodes can reach: each gateway of their deployment forwards to them too.
    reachable: dict[UUID, list[Any]] = defaultdict(list)
    for row in (
        Replica.objects.filter(deployment__in={r.deployment_id for r in replicas})
        .exclude(url="")
        .filter(node__isnull=False)
        .order_by("pk")
        .values_list("deployment_id", "node_id", "pk", "url", named=True)
    ):
        reachable[row.deployment_id].append(row)
    served = fleet_selectors.tenants_served({r.deployment for r in replicas})
    tenant_ids = {t for tenants in served.values() for t in tenants}
    policies = tenancy_selectors.policies_for(tenant_ids)
    keys: dict[UUID, list[str]] = defaultdict(list)
    for tenant_id, key_hash in (
        InferenceKey.objects.filter(
            tenant_id__in=tenant_ids, tenant__is_active=True, revoked_at__isnull=True
        )
        .order_by("digest")
        .values_list("tenant_id", "digest")
    ):
        keys[tenant_id].append(key_hash)
    workers: dict[UUID, list[WorkerSpec]] = defaultdict(list)
    for replica in replicas:
        d = replica.deployment
        workers[replica.node_id].append(
            WorkerSpec(
                replica_id=replica.pk,
                deployment_id=d.pk,
                tenant_id=d.tenant_id,
                model_name=d.model_name,
                artifact=_artifact(d),
                volume=replica.volume_name if replica.pool_id else None,
                runtime_options=d.runtime_options,
                gpu_indices=list(replica.gpu_indices),
                max_batch_size=d.max_batch_size,
                max_tokens_per_step=d.max_tokens_per_step,
                max_queue_delay_ms=d.max_queue_delay_ms,
                max_queue_len=d.max_queue_len,
                tpot_steps=d.tpot_steps,
                tenants=[policies[t].serving(keys[t]) for t in served[d.pk]],
                peer_key_hash=digest(peer_key(d.pk)) if reachable[d.pk] else None,
            )
        )
    storage = render_storage(nodes, replicas)
    thresholds = [source(nodes, replicas, served) for source in hooks.threshold_sources]

    def gateway(node: Node) -> GatewaySpec | None:
        """In front of the node's deployments, with their replicas on other nodes."""
        if not (node.gateway and workers[node.pk]):
            return None
        fronted = sorted({w.deployment_id for w in workers[node.pk]}, key=str)
        peers = [
            PeerDeployment(
                deployment_id=d,
                key=peer_key(d),
                replicas=[
                    PeerReplica(replica_id=r.pk, url=r.url)
                    for r in reachable[d]
                    if r.node_id != node.pk
                ],
            )
            for d in fronted
            if reachable[d]
        ]
        return GatewaySpec(port=settings.GATEWAY_PORT, peers=peers)

    return {
        node.pk: Components(
            workers=sorted(workers[node.pk], key=lambda w: str(w.replica_id)),
            gateway=gateway(node),
            slo_thresholds=[t for found in thresholds for t in found[node.pk]],
            **storage[node.pk],
        )
        for node in nodes
    }


@transaction.atomic
def issue_revisions(
    nodes: list[Node], *, cause: str, components: dict[UUID, Components] | None = None
) -> list[Revision]:
    """Store and push a new signed revision for each node whose content changed; the
    nodes' rows are locked first, so two renderings never number a generation twice."""
    if not nodes:
        return []
    _lock(Node, [n.pk for n in nodes])
    components = components if components is not None else render_components(nodes)
    latest = Revision.objects.filter(node=OuterRef("pk")).order_by("-generation")
    heads = {
        row["pk"]: row
        for row in Node.objects.filter(pk__in=[n.pk for n in nodes])
        .annotate(
            head_generation=Max("revisions__generation"),
            head_hash=Subquery(latest.values("content_hash")[:1]),
        )
        .values("pk", "head_generation", "head_hash")
    }
    now = timezone.now()
    key = private_key()
    revisions = []
    for node in nodes:
        head = heads[node.pk]
        wanted = components[node.pk]
        state = DesiredState.build(node.pk, (head["head_generation"] or 0) + 1, now, wanted)
        never_had_work = head["head_hash"] is None and wanted == Components()
        if state.content_hash == head["head_hash"] or never_had_work:
            continue  # unchanged, or nothing to say to a node that never had work
        signed = sign_state(state, key)
        revisions.append(
            Revision(
                node=node,
                generation=state.generation,
                content_hash=state.content_hash,
                document=signed.model_dump(mode="json"),
                cause=cause[:200],
            )
        )
    Revision.objects.bulk_create(revisions)
    push_after_commit(revisions)
    return revisions


def push_after_commit(revisions: list[Revision]) -> None:
    """Send each revision to its node's queue once the transaction that made it commits.

    The push only hastens delivery: agents also pull their desired state at start, after a
    reconnect and every minute. So a broker outage costs a warning, never the committed
    change or the answer to whoever made it.
    """
    messages = [(queue_name(r.node_id), r.document) for r in revisions]

    def send() -> None:
        pushed = 0
        try:
            with celery_app.producer_or_acquire() as producer:  # one connection for the batch
                for queue, document in messages:
                    celery_app.send_task(
                        APPLY_TASK,
                        args=[document],
                        queue=queue,
                        routing_key=queue,
                        producer=producer,
                    )
                    pushed += 1
        except OperationalError as exc:
            log.warning(
                "Broker unreachable (%s): %d of %d new revisions not pushed. They are stored; "
                "their agents pull them at their next resync (every minute by default) or "
                "reconnect.",
                exc,
                len(messages) - pushed,
                len(messages),
            )

    if messages:
        transaction.on_commit(send)


# --- Rollback -----------------------------------------------------------------------------


@transaction.atomic
def rollback(revision: Revision) -> Revision:
    """Re-issue an earlier revision's components as a new generation and hold the node there.

    The node is pinned, so later fleet changes do not silently undo the rollback;
    `release` un-pins it and renders the current plan again.
    """
    node = Node.objects.select_for_update(no_key=True).get(pk=revision.node_id)
    node.pinned = True
    node.save(update_fields=["pinned", "updated_at"])
    components = Components.model_validate(revision.document["state"]["components"])
    issued = issue_revisions(
        [node],
        cause=f"rollback to generation {revision.generation}",
        components={node.pk: components},
    )
    return (
        issued[0] if issued else Revision.objects.filter(node=node).order_by("-generation").first()
    )


@transaction.atomic
def delete_node(node: Node) -> None:
    """Decommission the node. Its replicas are placed anew after commit, in a transaction of
    their own (as in `release`), which also re-renders the nodes whose gateways reached
    them there."""
    placed = Replica.objects.filter(node=node)
    deployments = set(placed.values_list("deployment_id", flat=True))
    placed.update(url="")  # its addresses went with it
    hostname = node.hostname
    node.delete()
    if deployments:
        transaction.on_commit(
            lambda: reconcile_fleet(cause=f"node {hostname} deleted", touched=deployments)
        )


def release(node: Node) -> None:
    """Un-pin the node; the current plan is rendered for it again after commit, in a
    transaction of its own (re-planning locks tenants, deployments and nodes in that order,
    which it could not keep after this one wrote the node's row)."""
    Node.objects.filter(pk=node.pk).update(pinned=False, updated_at=timezone.now())
    node.pinned = False
    transaction.on_commit(lambda: reconcile_fleet(cause="released from rollback", nodes=[node.pk]))


# --- Reports from agents ------------------------------------------------------------------


def record_applied_status(node: Node, status: AppliedStatus) -> bool:
    """Record the agent's outcome; True if it was news, False for a report already stored
    (agents resend a report until it is acknowledged, so a repeat is answered as
    acknowledged and stored once).

    Never touches the node's row on the way of an applied or failed revision: that row is
    what planners lock, and a status report must not wait behind planning. The revision is
    one conditional update (only a newer report replaces an older one) and the applied
    generation one update of the agent's report. Rejections, which operators must see,
    land on the node.
    """
    stale = status.rejection_reason in ("replayed", "stale_generation")
    matched = 0
    if not stale:
        # A second delivery of a revision (pushed and also pulled) is refused by the agent
        # as a replay or as stale; that says nothing about the copy it applied, so only
        # other reports reach the revision.
        matched = (
            Revision.objects.filter(
                node=node, generation=status.generation, content_hash=status.content_hash
            )
            .filter(Q(reported_at__isnull=True) | Q(reported_at__lt=status.reported_at))
            .update(
                status=status.state,
                results=[c.model_dump(mode="json") for c in status.components],
                rejection_reason=status.rejection_reason or "",
                reported_at=status.reported_at,
                updated_at=timezone.now(),
            )
        )
        if matched:
            _follow_addresses(_record_workers([(node, status)]))
    if status.state == "rejected":
        # Whether or not it names a revision (a tampered one names none).
        return bool(
            Node.objects.filter(pk=node.pk)
            .exclude(last_rejection_at__gte=status.reported_at)
            .update(
                last_rejection_reason=status.rejection_reason,
                last_rejection_detail=status.detail or "",
                last_rejection_at=status.reported_at,
            )
        )
    if matched:
        inventory_services.record_applied_generation(node, status.generation, _gateway_url(status))
    return bool(matched)  # False: already stored (or newer news is), or no such revision


def record_applied_statuses(reports: Sequence[tuple[Node, AppliedStatus]]) -> None:
    """Several nodes' reports at once (those that came over the telemetry WebSocket), each
    recorded as `record_applied_status` records it. Reports of an applied or failed
    revision, a rollout's thousand, cost no statement of their own: one locked read and one
    update of their revisions and one of their agents' reports, then one read of their
    workers (whose addresses, mostly repeated, are written one by one as they change, as
    for one report). Rejections are recorded one by one."""
    applied: list[tuple[Node, AppliedStatus]] = []
    for node, status in reports:
        if status.state == "rejected":
            record_applied_status(node, status)
        else:
            applied.append((node, status))
    if applied:
        _follow_addresses(_record_workers(_record_applied(applied)))


@transaction.atomic
def _record_applied(
    reports: Sequence[tuple[Node, AppliedStatus]],
) -> list[tuple[Node, AppliedStatus]]:
    """Store the reports that are news for their revisions; returns those."""
    newest: dict[tuple[UUID, int, str], tuple[Node, AppliedStatus]] = {}
    for node, status in reports:  # the newest report of each revision
        key = (node.pk, status.generation, status.content_hash)
        if key not in newest or newest[key][1].reported_at < status.reported_at:
            newest[key] = (node, status)
    nodes_by_generation: dict[int, set[UUID]] = defaultdict(set)
    for node_id, generation, _ in newest:
        nodes_by_generation[generation].add(node_id)
    exact = Q()  # the revisions named, not every node's every generation named
    for generation, node_ids in nodes_by_generation.items():
        exact |= Q(generation=generation, node__in=node_ids)
    revisions = (
        Revision.objects.select_for_update(no_key=True)
        .filter(exact)
        .only("pk", "node_id", "generation", "content_hash", "reported_at")
        .order_by("pk")  # locked in key order: concurrent flushes never wait crosswise
    )
    now = timezone.now()
    changed: list[Revision] = []
    matched: list[tuple[Node, AppliedStatus]] = []
    for revision in revisions:
        found = newest.get((revision.node_id, revision.generation, revision.content_hash))
        if found is None:
            continue
        status = found[1]
        if revision.reported_at is not None and revision.reported_at >= status.reported_at:
            continue  # already stored, or newer news is
        revision.status = status.state
        revision.results = [c.model_dump(mode="json") for c in status.components]
        revision.rejection_reason = ""
        revision.reported_at = status.reported_at
        revision.updated_at = now
        changed.append(revision)
        matched.append(found)
    core.update_each(
        changed, ["status", "results", "rejection_reason", "reported_at", "updated_at"]
    )
    inventory_services.record_applied_generations(
        [(node, status.generation, _gateway_url(status)) for node, status in matched]
    )
    return matched


def _follow_addresses(readdressed: set[UUID]) -> None:
    """The gateways of the nodes holding these deployments' replicas follow their new
    addresses, once this commits; a deployment rolling out on N nodes reports N
    addresses at about once, so their revisions wait a moment for the rest."""
    if not readdressed:
        return
    nodes = set(
        Replica.objects.filter(deployment__in=readdressed, node__isnull=False)
        .values_list("node_id", flat=True)
        .distinct()
    )
    render = partial(_render, nodes, cause="worker address reported", settle_s=2.0)
    transaction.on_commit(render)


def _http(url: str | None) -> str:
    """Only http(s) addresses are shown to clients or given to gateways; else ""."""
    return url if url is not None and url.startswith(("http://", "https://")) else ""


def _gateway_url(status: AppliedStatus) -> str:
    """Where the node's gateway answers after this status."""
    for result in status.components:
        if result.kind == "gateway" and result.ok and _http(result.url):
            return _http(result.url)
    return ""


def _record_workers(reports: Sequence[tuple[Node, AppliedStatus]]) -> set[UUID]:
    """Where each worker on these nodes listens, as its agent found it answering as
    itself, and where other nodes reach it (http(s) only); a node speaks only for
    replicas placed on it. One read for all; a replica is written only when its address
    changed, which a report mostly repeats. Returns the deployments whose replicas'
    addresses for other nodes changed."""
    # (replica, reporting node) -> the newest report's (reported_at, port, url)
    reported: dict[tuple[UUID, UUID], tuple[datetime, int, str]] = {}
    for node, status in reports:
        for result in status.components:
            if result.kind == "worker" and result.ok and result.port is not None:
                with contextlib.suppress(ValueError):
                    key = (UUID(result.name.removeprefix("replica-")), node.pk)
                    if key not in reported or reported[key][0] < status.reported_at:
                        reported[key] = (status.reported_at, result.port, _http(result.url))
    if not reported:
        return set()
    readdressed = set()
    known = Replica.objects.filter(pk__in={replica for replica, _ in reported}).values_list(
        "pk", "node_id", "deployment_id", "port", "url"
    )
    for replica_id, node_id, deployment_id, port, known_url in known:
        found = reported.get((replica_id, node_id))
        if found is None:  # no report from the node it is placed on
            continue
        _, new_port, url = found
        if (port, known_url) != (new_port, url):
            Replica.objects.filter(pk=replica_id, node_id=node_id).exclude(
                port=new_port, url=url
            ).update(port=new_port, url=url, updated_at=timezone.now())
        if known_url != url:
            readdressed.add(deployment_id)
    return readdressed


def latest_tag(node: Node) -> str | None:
    """The entity tag of the node's newest revision (see `state_tag`), without loading its
    document; None if it has none."""
    head = (
        Revision.objects.filter(node=node)
        .order_by("-generation")
        .values_list("generation", "content_hash")
        .first()
    )
    return state_tag(*head) if head else None


def latest_document(node: Node) -> dict[str, Any] | None:
    revision = Revision.objects.filter(node=node).order_by("-generation").first()
    return revision.document if revision else None


def rollout_state(desired: int | None, applied: int, head_status: str | None) -> str:
    if desired is None:
        return "none"
    if head_status in (RevisionStatus.FAILED, RevisionStatus.REJECTED):
        return str(head_status)
    return "in_sync" if applied >= desired else "pending"

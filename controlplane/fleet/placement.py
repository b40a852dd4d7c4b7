"""Placement: which node (and which GPUs) each replica runs on, and why.

Pure functions over in-memory rows, so tests need no database. A plan covers some
deployments; replicas of the others only hold their GPUs and pool room (`NodeRoom.hold`).
The rules, in order:

1. Stability. A replica keeps its place while it stays valid, so nothing flaps back
   when a lost node returns. A drained node (maintenance), one now dedicated to another
   tenant, or GPUs or pool no longer there make the place invalid: the replica
   moves, or waits unplaced. An unreachable node is left as soon as another node has
   room; until then the replica stays (the node cannot be told to stop anyway).
2. Tenant quotas (GPUs, replicas) cap what is placed, kept placements first; the
   surplus stays unplaced with the reason "tenant quota: ...".
3. Among the nodes that fit (ready, not drained, not another tenant's, labels, GPU
   model, GPU memory, free GPUs, storage pool), the best GPU set wins by topology:
   most GPUs sharing their PCIe root port with an active RDMA NIC (GPUDirect RDMA then
   stays below that port instead of crossing the CPU's interconnect), then their NUMA
   node with one; then most sharing their root port with an NVMe drive, then their NUMA
   node with one; then all GPUs on one NUMA node. Where agents report no root port the
   root-port tiers count nothing and the NUMA tiers decide alone. Ties go to the
   deployment's strategy (spread: fewest replicas of it, then fewest replicas in all;
   pack: most replicas of it, then fewest free GPUs), then to the hostname.

Every replica records why: `reason` in words, `explanation` as JSON.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import groupby
from typing import Any

from controlplane.fleet.choices import PlacementStrategy
from controlplane.inventory.choices import NodeStatus

GIB = 1 << 30
NAMED_IN_REASON = 5  # hostnames named per refusal in `reason`
NAMED_IN_EXPLANATION = 20  # ... and in `explanation`
ALTERNATIVES = 3  # runner-up nodes shown in `explanation`


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _gpu_ids(indices: list[int]) -> str:
    return f"GPU{'s' if len(indices) > 1 else ''} {','.join(str(i) for i in indices)}"


def _gib(size: int) -> str:
    return f"{size / GIB:.4g} GiB"


@dataclass(frozen=True)
class Quota:
    """A tenant's caps; None means unlimited."""

    tenant: str
    max_gpus: int | None = None
    max_replicas: int | None = None


@dataclass
class Usage:
    """What a tenant's placed replicas hold while planning."""

    gpus: int = 0
    replicas: int = 0

    def refusal(self, quota: Quota | None, gpus: int) -> str | None:
        """Why one more replica of `gpus` GPUs would break the quota, or None."""
        if quota is None:
            return None
        if quota.max_replicas is not None and self.replicas + 1 > quota.max_replicas:
            return (
                f"tenant quota: {quota.tenant} may run {_plural(quota.max_replicas, 'replica')}"
                f", {self.replicas} already placed"
            )
        if quota.max_gpus is not None and self.gpus + gpus > quota.max_gpus:
            return (
                f"tenant quota: {quota.tenant} may use {_plural(quota.max_gpus, 'GPU')}, "
                f"{self.gpus} in use, this replica needs {gpus}"
            )
        return None

    def add(self, gpus: int, sign: int = 1) -> None:
        self.gpus += sign * gpus
        self.replicas += sign


@dataclass(frozen=True)
class GpuChoice:
    """A set of free GPUs on one node, scored by what shares their root ports and NUMA nodes."""

    gpus: tuple[Any, ...]
    nic_root: int
    """GPUs whose PCIe root port has an active RDMA NIC under it."""
    near_nic: int
    """GPUs whose NUMA node has an active RDMA NIC."""
    drive_root: int
    """GPUs whose PCIe root port has an NVMe drive under it."""
    near_drive: int
    """GPUs whose NUMA node has an NVMe drive."""
    one_numa: bool
    """All GPUs on one (known) NUMA node."""
    fit: int
    """Free GPUs in the group it was cut from: fewer leaves bigger groups whole."""

    @property
    def indices(self) -> list[int]:
        return [gpu.index for gpu in self.gpus]

    @property
    def topology(self) -> tuple[int, ...]:
        """The score, strongest tier first."""
        return self.nic_root, self.near_nic, self.drive_root, self.near_drive, int(self.one_numa)


@dataclass
class NodeRoom:
    """What is still free on one node while planning, and its hardware's locality."""

    node: Any
    gpus: list[Any]
    pools: dict[Any, int] = field(default_factory=dict)
    """Free bytes for model volumes in each of the node's pools (by pool id)."""
    nics: list[Any] = field(default_factory=list)
    drives: list[Any] = field(default_factory=list)
    used_gpus: set[int] = field(default_factory=set)
    replicas_of: Counter[Any] = field(default_factory=Counter)
    version: int = 0
    """Bumped by `take` and `release`, so a planner knows which answers went stale."""

    def __post_init__(self) -> None:
        self.nics_on: dict[int, list[str]] = defaultdict(list)
        self.drives_on: dict[int, list[str]] = defaultdict(list)
        self.nics_under: dict[str, list[str]] = defaultdict(list)
        """Active RDMA NICs by PCIe root port ("" and None, unknown, are left out)."""
        self.drives_under: dict[str, list[str]] = defaultdict(list)
        for nic in self.nics:
            if nic.state.lower() != "active":
                continue
            if nic.numa_node is not None and nic.device not in self.nics_on[nic.numa_node]:
                self.nics_on[nic.numa_node].append(nic.device)
            if nic.pci_root and nic.device not in self.nics_under[nic.pci_root]:
                self.nics_under[nic.pci_root].append(nic.device)
        for drive in self.drives:
            if drive.numa_node is not None:
                self.drives_on[drive.numa_node].append(drive.name)
            if drive.pci_root:
                self.drives_under[drive.pci_root].append(drive.name)

    @property
    def free_gpus(self) -> int:
        return len(self.gpus) - len(self.used_gpus)

    def fits(self, gpu: Any, deployment: Any) -> bool:
        return (
            deployment.gpu_model.lower() in gpu.name.lower()
            and gpu.memory_total_bytes >= deployment.min_gpu_memory_bytes
        )

    def choose_gpus(self, deployment: Any) -> GpuChoice | str:
        """The best free GPU set for one replica, or why the node has none."""
        wanted = deployment.gpus_per_replica
        if wanted == 0:
            return GpuChoice((), 0, 0, 0, 0, one_numa=False, fit=0)
        model = deployment.gpu_model
        label = f"{model} GPUs" if model else "GPUs"
        matching = [g for g in self.gpus if model.lower() in g.name.lower()]
        if len(matching) < wanted:
            if model and self.gpus and not matching:
                names = ", ".join(sorted({g.name for g in self.gpus}))
                return f"has no {label} (has {names})"
            return f"has {len(matching)} {label}, needs {wanted}"
        roomy = [g for g in matching if self.fits(g, deployment)]
        if len(roomy) < wanted:
            need = _gib(deployment.min_gpu_memory_bytes)
            return f"has too little GPU memory: {len(roomy)} of {len(matching)} {label} have {need}, needs {wanted}"
        free = [g for g in roomy if g.index not in self.used_gpus]
        if len(free) < wanted:
            return f"has busy GPUs: {len(free)} of {len(roomy)} {label} free, needs {wanted}"
        options = [
            option
            for name, same in groupby(
                sorted(free, key=lambda g: (g.name, g.index)), key=lambda g: g.name
            )
            for option in self._options(list(same), wanted)
        ]
        if not options:
            return f"has no {wanted} free {label} of one model"
        return min(options, key=lambda o: (tuple(-x for x in o.topology), o.fit, o.indices))

    def _options(self, free: list[Any], wanted: int) -> list[GpuChoice]:
        """Candidate sets among GPUs of one model: each NUMA node that holds enough on its
        own, and one set across NUMA nodes, best-wired first (by NUMA node, then within
        one by root port)."""
        if len(free) < wanted:
            return []
        by_numa: dict[int | None, list[Any]] = defaultdict(list)
        for gpu in sorted(free, key=lambda g: (-self._root_nearness(g.pci_root), g.index)):
            by_numa[gpu.numa_node].append(gpu)
        options = [
            self._choice(group[:wanted], len(group))
            for numa, group in by_numa.items()
            if numa is not None and len(group) >= wanted
        ]
        ordered = sorted(
            by_numa.values(),
            key=lambda g: (-self._nearness(g[0].numa_node), -len(g), min(x.index for x in g)),
        )
        options.append(
            self._choice([gpu for group in ordered for gpu in group][:wanted], len(free))
        )
        return options

    def _nearness(self, numa: int | None) -> int:
        if numa is None:
            return 0
        return 2 * bool(self.nics_on.get(numa)) + bool(self.drives_on.get(numa))

    def _root_nearness(self, root: str | None) -> int:
        if not root:
            return 0
        return 2 * bool(self.nics_under.get(root)) + bool(self.drives_under.get(root))

    def _choice(self, gpus: list[Any], fit: int) -> GpuChoice:
        numas = {g.numa_node for g in gpus}
        return GpuChoice(
            gpus=tuple(sorted(gpus, key=lambda g: g.index)),
            nic_root=sum(1 for g in gpus if g.pci_root and self.nics_under.get(g.pci_root)),
            near_nic=sum(
                1 for g in gpus if g.numa_node is not None and self.nics_on.get(g.numa_node)
            ),
            drive_root=sum(1 for g in gpus if g.pci_root and self.drives_under.get(g.pci_root)),
            near_drive=sum(
                1 for g in gpus if g.numa_node is not None and self.drives_on.get(g.numa_node)
            ),
            one_numa=len(numas) == 1 and None not in numas,
            fit=fit,
        )

    def _shared_roots(self, choice: GpuChoice) -> list[dict[str, Any]]:
        """Each known root port of the chosen GPUs with what else sits under it."""
        gpus_under: dict[str, list[int]] = defaultdict(list)
        for gpu in choice.gpus:
            if gpu.pci_root:
                gpus_under[gpu.pci_root].append(gpu.index)
        return [
            {
                "root": root,
                "gpus": gpus,
                "rdma_nics": list(self.nics_under.get(root, [])),
                "nvme_drives": list(self.drives_under.get(root, [])),
            }
            for root, gpus in sorted(gpus_under.items(), key=lambda item: item[1])
        ]

    def describe(self, choice: GpuChoice) -> str:
        """The chosen GPUs and their NUMA and root-port neighbours in words."""
        if not choice.gpus:
            return "no GPUs needed"
        parts = []
        by_numa = sorted(choice.gpus, key=lambda g: (g.numa_node is None, g.numa_node or 0))
        for numa, group in groupby(by_numa, key=lambda g: g.numa_node):
            ids = _gpu_ids([g.index for g in group])
            if numa is None:
                parts.append(f"{ids} (NUMA node unknown)")
                continue
            near = " and ".join(
                ", ".join(names)
                for names in (self.nics_on.get(numa), self.drives_on.get(numa))
                if names
            )
            parts.append(
                f"{ids} on NUMA {numa} with {near} (same NUMA)"
                if near
                else f"{ids} on NUMA {numa} with no RDMA NIC or NVMe drive there"
            )
        for shared in self._shared_roots(choice):
            near = " and ".join(
                ", ".join(names) for names in (shared["rdma_nics"], shared["nvme_drives"]) if names
            )
            if near:
                verb = "share" if len(shared["gpus"]) > 1 else "shares"
                parts.append(
                    f"{_gpu_ids(shared['gpus'])} {verb} PCIe root port {shared['root']} with {near}"
                )
        memory = min(g.memory_total_bytes for g in choice.gpus)
        return f"{'; '.join(parts)}, {choice.gpus[0].name} ({_gib(memory)})"

    def neighbours(self, choice: GpuChoice) -> dict[str, Any]:
        numas = sorted({g.numa_node for g in choice.gpus if g.numa_node is not None})
        return {
            "gpus": choice.indices,
            "gpu_model": choice.gpus[0].name if choice.gpus else "",
            "gpu_memory_bytes": min((g.memory_total_bytes for g in choice.gpus), default=0),
            "numa_nodes": numas,
            "rdma_nics": [nic for numa in numas for nic in self.nics_on.get(numa, [])],
            "nvme_drives": [drive for numa in numas for drive in self.drives_on.get(numa, [])],
            "pcie_roots": self._shared_roots(choice),
            "topology": {
                "gpus_same_root_as_rdma_nic": choice.nic_root,
                "gpus_near_rdma_nic": choice.near_nic,
                "gpus_same_root_as_nvme_drive": choice.drive_root,
                "gpus_near_nvme_drive": choice.near_drive,
                "one_numa_node": choice.one_numa,
            },
        }

    def fitting_pool(self, size_bytes: int) -> Any:
        """The pool with the most room if it can hold `size_bytes`, else None."""
        best = max(self.pools, key=lambda pk: self.pools[pk], default=None)
        return best if best is not None and self.pools[best] >= size_bytes else None

    def take(
        self,
        replica: Any,
        gpu_indices: list[int],
        port: int | None = None,
        pool: Any = None,
        volume_bytes: int = 0,
    ) -> None:
        replica.node = self.node
        replica.gpu_indices = gpu_indices
        replica.port = port  # the agent reports where its worker listens
        replica.pool_id = pool
        self.used_gpus.update(gpu_indices)
        self.replicas_of[replica.deployment_id] += 1
        if pool is not None:
            self.pools[pool] -= volume_bytes
        self.version += 1

    def hold(
        self, deployment_id: Any, gpu_indices: list[int], pool: Any, volume_bytes: int
    ) -> None:
        """Count a replica this plan leaves alone: its GPUs and pool room stay taken."""
        self.used_gpus.update(gpu_indices)
        self.replicas_of[deployment_id] += 1
        if pool is not None and pool in self.pools:
            self.pools[pool] -= volume_bytes
        self.version += 1

    def release(self, replica: Any, volume_bytes: int = 0) -> None:
        """Undo `take` (the replica's own fields are left for the caller)."""
        self.used_gpus.difference_update(replica.gpu_indices)
        self.replicas_of[replica.deployment_id] -= 1
        if replica.pool_id is not None:
            self.pools[replica.pool_id] += volume_bytes
        self.version += 1


def _off_limits(deployment: Any, node: Any) -> str | None:
    """Why `node` may hold no replica of `deployment`, new or running, or None."""
    if node.maintenance:
        return "node is in maintenance"
    if node.tenant_id is not None and node.tenant_id != deployment.tenant_id:
        return "node is dedicated to another tenant"
    return None


def node_refusal(deployment: Any, node: Any) -> str | None:
    """The first node-level requirement `node` fails for new work of `deployment`, or None.

    Labels bind new work only: a running replica stays when they change."""
    if node.status != NodeStatus.READY:
        return f"node is {node.status}"
    off_limits = _off_limits(deployment, node)
    if off_limits is not None:
        return off_limits
    for key, value in deployment.node_selector.items():
        if node.labels.get(key) != value:
            return f"lacks label {key}={value}"
    return None


def candidate(deployment: Any, room: NodeRoom) -> GpuChoice | str:
    """This node's best GPU set for one more replica of `deployment`, or why there is none."""
    refusal = node_refusal(deployment, room.node)
    if refusal is not None:
        return refusal
    choice = room.choose_gpus(deployment)
    if isinstance(choice, str):
        return choice
    size = deployment.model_volume_bytes or 0
    if size and room.fitting_pool(size) is None:
        return f"has no storage pool with {size} bytes free"
    return choice


def _problem(replica: Any, deployment: Any, room: NodeRoom) -> tuple[str, bool] | None:
    """Why a replica's current place no longer holds, and whether it may stay there until
    another node has room; None while it holds."""
    node = room.node
    off_limits = _off_limits(deployment, node)
    if off_limits is not None:
        return off_limits, False
    held = set(replica.gpu_indices)
    fitting = {gpu.index for gpu in room.gpus if room.fits(gpu, deployment)}
    if len(held) != deployment.gpus_per_replica or not held <= fitting:
        return "its GPUs are gone or no longer fit the deployment", False
    if held & room.used_gpus:
        return "its GPUs are taken", False
    needed = deployment.model_volume_bytes
    if needed and room.pools.get(replica.pool_id, -1) < needed:
        return "its storage pool lacks room", False
    if node.status != NodeStatus.READY:
        return f"node is {node.status}", True
    return None


def _ruled_out(refusals: Mapping[str, list[str]]) -> tuple[str, list[dict[str, Any]]]:
    """Refusals grouped by reason, most common first: in words, and as data."""
    groups = sorted(refusals.items(), key=lambda item: (-len(item[1]), item[0]))
    words = []
    for reason, hosts in groups:
        named = ", ".join(hosts[:NAMED_IN_REASON])
        more = len(hosts) - NAMED_IN_REASON
        words.append(f"{len(hosts)} {reason} [{named}{f' and {more} more' if more > 0 else ''}]")
    data = [
        {"reason": reason, "count": len(hosts), "nodes": hosts[:NAMED_IN_EXPLANATION]}
        for reason, hosts in groups
    ]
    return "; ".join(words), data


def _strategy_words(deployment: Any, room: NodeRoom) -> str:
    mine = _plural(room.replicas_of[deployment.pk], "replica")
    if deployment.placement_strategy == PlacementStrategy.PACK:
        return (
            f"pack: {mine} of this deployment already there, {_plural(room.free_gpus, 'GPU')} free"
        )
    return f"spread: {mine} of this deployment already there"


def _rank(deployment: Any, room: NodeRoom, choice: GpuChoice) -> tuple[Any, ...]:
    topology = tuple(-x for x in choice.topology)
    mine, total = room.replicas_of[deployment.pk], sum(room.replicas_of.values())
    if deployment.placement_strategy == PlacementStrategy.PACK:
        strategy: tuple[int, ...] = (-mine, room.free_gpus, -total)
    else:
        strategy = (mine, total)
    return (topology, strategy, choice.fit, room.node.hostname)


@dataclass
class _Move:
    """A replica to (re)place; `stay` is the unreachable node it may keep meanwhile."""

    deployment: Any
    replica: Any
    left: tuple[str, str] | None = None
    stay: NodeRoom | None = None


def _unplace(replica: Any, reason: str, explanation: dict[str, Any]) -> None:
    replica.node, replica.gpu_indices, replica.port, replica.pool_id = None, [], None, None
    replica.reason, replica.explanation = reason, explanation


_Answer = tuple[int, GpuChoice | str, tuple[Any, ...] | None]
"""A node's answer for one deployment: (room version, candidate or refusal, rank)."""


class _Planner:
    def __init__(self, rooms: Mapping[Any, NodeRoom], quotas: Mapping[Any, Quota]) -> None:
        self.rooms = sorted(rooms.values(), key=lambda r: r.node.hostname)
        self.quotas = quotas
        self.usage: dict[Any, Usage] = defaultdict(Usage)
        self.answers: dict[Any, dict[int, _Answer]] = {}

    def survey(self, deployment: Any) -> list[_Answer]:
        """Every node's answer for one more replica of `deployment`. Placing a replica
        changes one node, so only answers of nodes changed since are worked out again:
        planning stays near-linear in nodes times replicas."""
        answers = self.answers.setdefault(deployment.pk, {})
        for i, room in enumerate(self.rooms):
            answer = answers.get(i)
            if answer is None or answer[0] != room.version:
                result = candidate(deployment, room)
                rank = None if isinstance(result, str) else _rank(deployment, room, result)
                answers[i] = (room.version, result, rank)
        return [answers[i] for i in range(len(self.rooms))]

    def quota_refusal(self, deployment: Any) -> str | None:
        return self.usage[deployment.tenant_id].refusal(
            self.quotas.get(deployment.tenant_id), deployment.gpus_per_replica
        )

    def take(self, room: NodeRoom, replica: Any, deployment: Any, **where: Any) -> None:
        size = deployment.model_volume_bytes or 0
        room.take(replica, volume_bytes=size, **where)
        self.usage[deployment.tenant_id].add(deployment.gpus_per_replica)

    def release(self, room: NodeRoom, replica: Any, deployment: Any) -> None:
        room.release(replica, deployment.model_volume_bytes or 0)
        self.usage[deployment.tenant_id].add(deployment.gpus_per_replica, -1)

    def keep(self, replica: Any, deployment: Any, room: NodeRoom) -> None:
        pool = replica.pool_id if deployment.model_volume_bytes else None
        self.take(
            room,
            replica,
            deployment,
            gpu_indices=list(replica.gpu_indices),
            port=replica.port,
            pool=pool,
        )

    def place(self, move: _Move) -> None:
        deployment, replica = move.deployment, move.replica
        left = f"left {move.left[0]} ({move.left[1]}); " if move.left else ""
        moved_from = (
            {"moved_from": {"node": move.left[0], "why": move.left[1]}} if move.left else {}
        )
        if move.stay is not None:
            self.release(move.stay, replica, deployment)
        over = self.quota_refusal(deployment)
        if over is not None:
            _unplace(
                replica, f"not placed: {left}{over}", {"placed": False, "quota": over, **moved_from}
            )
            return
        ranked: list[tuple[Any, NodeRoom, GpuChoice]] = []
        refusals: dict[str, list[str]] = defaultdict(list)
        for room, (_, result, rank) in zip(self.rooms, self.survey(deployment), strict=True):
            if isinstance(result, str):
                refusals[result].append(room.node.hostname)
            else:
                ranked.append((rank, room, result))
        fits = len(ranked)
        ranked = heapq.nsmallest(1 + ALTERNATIVES, ranked, key=lambda item: item[0])
        detail, ruled_out = _ruled_out(refusals)
        if not ranked and move.stay is not None:
            self.keep(replica, deployment, move.stay)
            node = move.stay.node
            replica.reason = (
                f"placed on {node.hostname}, which is {node.status}: kept until another node has "
                f"room (no other node fits: {detail})"
            )
            replica.explanation = {
                "placed": True,
                "node": node.hostname,
                "gpus": list(replica.gpu_indices),
                "stranded": True,
                "why": f"node is {node.status}",
                "ruled_out": ruled_out,
            }
            return
        if not ranked:
            _unplace(
                replica,
                f"not placed: {left}no node fits ({detail or 'no nodes'})",
                {"placed": False, "ruled_out": ruled_out, **moved_from},
            )
            return
        _, room, choice = ranked[0]
        size = deployment.model_volume_bytes or 0
        strategy = _strategy_words(deployment, room)
        explanation = {
            "placed": True,
            "node": room.node.hostname,
            **room.neighbours(choice),
            "strategy": deployment.placement_strategy,
            "replicas_of_deployment_on_node": room.replicas_of[deployment.pk],
            "free_gpus_on_node": room.free_gpus,
            "nodes_fit": fits,
            "nodes_total": len(self.rooms),
            "alternatives": [
                {"node": other.node.hostname, "gpus": alt.indices, "summary": other.describe(alt)}
                for _, other, alt in ranked[1 : 1 + ALTERNATIVES]
            ],
            "ruled_out": ruled_out,
            **moved_from,
        }
        self.take(
            room,
            replica,
            deployment,
            gpu_indices=choice.indices,
            pool=room.fitting_pool(size) if size else None,
        )
        moved = f" (moved from {move.left[0]}: {move.left[1]})" if move.left else ""
        replica.reason = (
            f"placed on {room.node.hostname}{moved}: {room.describe(choice)}; {strategy}; "
            f"{fits} of {len(self.rooms)} nodes fit"
        )
        replica.explanation = explanation


class FleetNeeded(Exception):
    """A plan given only its replicas' nodes must move or place a replica: every node's
    answer is needed, so the caller plans again with the whole fleet's rooms."""


def plan(
    deployments: list[Any],
    rooms: dict[Any, NodeRoom],
    replicas: list[Any],
    new_replica: Any,
    quotas: Mapping[Any, Quota] | None = None,
    *,
    whole_fleet: bool = True,
) -> tuple[list[Any], list[Any]]:
    """Place every deployment's replicas; returns (replicas to save, replicas to delete).

    `new_replica(deployment, index)` builds an unsaved replica row; `quotas` maps tenant
    ids to their caps (absent: unlimited). Without `whole_fleet`, `rooms` hold only the
    nodes the replicas are on, which is enough to keep them; a replica to place or move
    raises `FleetNeeded` before anything is chosen.
    """
    by_deployment: dict[Any, dict[int, Any]] = {}
    to_delete = []
    wanted = {d.pk: d for d in deployments}
    for replica in replicas:
        deployment = wanted.get(replica.deployment_id)
        if deployment is None or replica.index >= deployment.replicas:
            to_delete.append(replica)
        else:
            by_deployment.setdefault(deployment.pk, {})[replica.index] = replica

    planner = _Planner(rooms, quotas or {})
    # Existing placements first, so new work never displaces running replicas.
    displaced: list[_Move] = []
    pending: list[_Move] = []
    to_save = []
    for deployment in deployments:
        existing = by_deployment.get(deployment.pk, {})
        for index in range(deployment.replicas):
            replica = existing.get(index) or new_replica(deployment, index)
            to_save.append(replica)
            room = rooms.get(replica.node_id) if replica.node_id else None
            if room is None:
                pending.append(_Move(deployment, replica))
                continue
            problem = _problem(replica, deployment, room)
            if problem is not None and not problem[1]:
                pending.append(_Move(deployment, replica, left=(room.node.hostname, problem[0])))
                continue
            over = planner.quota_refusal(deployment)
            if over is not None:
                _unplace(replica, f"not placed: {over}", {"placed": False, "quota": over})
                continue
            planner.keep(replica, deployment, room)
            if problem is not None:
                displaced.append(_Move(deployment, replica, (room.node.hostname, problem[0]), room))
            elif replica.explanation.get("stranded"):
                replica.reason = f"placed on {room.node.hostname}: kept there, the node is back"
                replica.explanation = {
                    "placed": True,
                    "node": room.node.hostname,
                    "gpus": list(replica.gpu_indices),
                    "kept": True,
                }

    if (displaced or pending) and not whole_fleet:
        raise FleetNeeded
    for move in displaced + pending:  # running replicas first
        planner.place(move)
    return to_save, to_delete

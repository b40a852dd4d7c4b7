"""Read side of the SLO console: each SLO's state, budget and burn rates now, its history
for the detail page, and the fleet's health roll-up.

Every figure is the SLI math of `slo.sli` over the exact good/total rollups
(`slo.selectors.slo_counts`), never an estimate; percentiles come from the merged sketches.
Visibility follows the tenant scoping: a tenant user sees only their tenants' SLOs, the
alerts of those SLOs, and the changes whose cause names what the SLO measures.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from django.db.models import Q, QuerySet, Sum

from controlplane.alerts.choices import AlertState, Severity
from controlplane.alerts.models import Alert
from controlplane.core.scoping import readable_tenant_ids, scope
from controlplane.fleet.models import Deployment, Replica, Revision
from controlplane.fleet.selectors import serving
from controlplane.inventory.choices import NodeStatus
from controlplane.inventory.models import Node
from controlplane.slo import selectors as slo_selectors
from controlplane.slo.choices import Sli
from controlplane.slo.models import Slo, SloRevision
from controlplane.slo.reports import seconds_text
from controlplane.slo.sli import (
    BurnRule,
    Counts,
    burn_rules,
    ceil_to,
    duration_label,
    floor_to,
    window_length,
    window_start,
)
from controlplane.telemetry.models import LatencyRollup
from controlplane.telemetry.pipeline.publish import latency_summary
from controlplane.telemetry.selectors import resolution_for, visible_nodes
from dataplane.sketch import LatencySketch

SPARK_POINTS = 24
CHART_POINTS = 60
AT_RISK_BUDGET = 0.25
"""Below this share of its budget left, an SLO is at risk even when nothing burns fast."""

STATES = ("exhausted", "burning", "at_risk", "no_data", "ok")
"""Worst first: the overview's order."""

LATENCY_SLIS = {Sli.TTFT, Sli.TPOT, Sli.ITL, Sli.E2E, Sli.STORAGE_READ}


def visible_slos(user: Any) -> QuerySet[Slo]:
    return scope(Slo.objects.select_related("tenant", "deployment"), user).order_by(
        "tenant__slug", "name"
    )


def _moments(start: datetime, end: datetime, points: int) -> list[datetime]:
    step = (end - start) / (points - 1)
    return [start + step * i for i in range(points)]


def _rule(rule: BurnRule, counts: dict[str, Counts], objective: float) -> dict[str, Any]:
    long, short = counts[duration_label(rule.long)], counts[duration_label(rule.short)]
    rate_long, rate_short = long.burn_rate(objective), short.burn_rate(objective)
    return {
        "severity": rule.severity,
        "factor": rule.factor,
        "long_window": duration_label(rule.long),
        "short_window": duration_label(rule.short),
        "long_rate": rate_long,
        "short_rate": rate_short,
        "burning": rate_long >= rule.factor and rate_short >= rule.factor,
    }


def _budget_points(
    slo: Slo, moments: list[datetime], counts: dict[str, Counts]
) -> list[dict[str, Any]]:
    """Budget remaining in the window ending at each moment (counts keyed `t<i>`); None
    where that window held no events, so charts draw a gap rather than an untouched 100%."""
    return [
        {
            "t": t.timestamp(),
            "value": None
            if (c := counts[f"t{i}"]).total == 0
            else c.budget_remaining(slo.objective),
        }
        for i, t in enumerate(moments)
    ]


def _state(whole: Counts, budget: float, rules: list[dict[str, Any]]) -> str:
    if whole.total == 0:
        return "no_data"
    if budget <= 0:
        return "exhausted"
    if any(r["burning"] for r in rules if r["severity"] == Severity.PAGE):
        return "burning"
    if budget < AT_RISK_BUDGET or any(r["burning"] for r in rules):
        return "at_risk"
    return "ok"


def _facts(slo: Slo) -> dict[str, Any]:
    return {
        "id": slo.pk,
        "name": slo.name,
        "display_name": slo.display_name or slo.name,
        "tenant": {"id": slo.tenant_id, "slug": slo.tenant.slug, "name": slo.tenant.name},
        "sli": slo.sli,
        "threshold_seconds": slo.threshold_seconds,
        "objective": slo.objective,
        "window": slo.window,
        "revision": slo.revision,
        "scope": slo.scope,
        "deployment": slo.deployment.name if slo.deployment else None,
        "model_name": slo.model_name or None,
        "updated_at": slo.updated_at,
    }


def _firing(slos: list[Slo]) -> dict[Any, list[Alert]]:
    """Firing alerts per SLO, in one query."""
    found: dict[Any, list[Alert]] = defaultdict(list)
    by_key = {(slo.tenant_id, slo.name): slo.pk for slo in slos}
    alerts = Alert.objects.filter(
        state=AlertState.FIRING,
        tenant_id__in={slo.tenant_id for slo in slos},
        labels__has_key="slo",
    ).order_by("starts_at")
    for alert in alerts:
        slo_id = by_key.get((alert.tenant_id, alert.labels.get("slo")))
        if slo_id is not None:
            found[slo_id].append(alert)
    return found


def _alert(alert: Alert) -> dict[str, Any]:
    return {
        "id": alert.pk,
        "alertname": alert.name,
        "severity": alert.severity,
        "state": alert.state,
        "window": alert.labels.get("window", ""),
        "summary": alert.annotations.get("summary", ""),
        "starts_at": alert.starts_at,
        "ends_at": alert.ends_at,
    }


def slo_summary(slo: Slo, now: datetime, firing: list[Alert]) -> dict[str, Any]:
    """One SLO now: state, objective vs achieved, budget (with a sparkline over the window)
    and each burn-rate rule's windows against its factor. One query."""
    rules = burn_rules(slo.window, now)
    start = window_start(slo.window, now)
    windows = {"slo": (start, now)}
    for rule in rules:
        for length in (rule.long, rule.short):
            windows[duration_label(length)] = (now - length, now)
    moments = _moments(start, now, SPARK_POINTS)
    windows.update({f"t{i}": (window_start(slo.window, t), t) for i, t in enumerate(moments)})
    counts = slo_selectors.slo_counts(slo, windows, now)
    whole = counts["slo"]
    budget = whole.budget_remaining(slo.objective)
    burn = [_rule(rule, counts, slo.objective) for rule in rules]
    return {
        **_facts(slo),
        "state": _state(whole, budget, burn),
        "good": whole.good,
        "total": whole.total,
        "achieved_ratio": whole.achieved(),
        "budget_remaining_ratio": budget,
        "budget_sparkline": _budget_points(slo, moments, counts),
        "burn_rates": burn,
        "firing": [_alert(a) for a in firing],
    }


def _worst_first(summary: dict[str, Any]) -> tuple[int, float, str]:
    return (
        STATES.index(summary["state"]),
        summary["budget_remaining_ratio"],
        summary["display_name"],
    )


def slo_overview(user: Any, now: datetime, tenant_id: Any = None) -> dict[str, Any]:
    """Every SLO the user may see (or only `tenant_id`'s), worst first."""
    slos = visible_slos(user)
    if tenant_id is not None:
        slos = slos.filter(tenant_id=tenant_id)
    slos = list(slos)
    firing = _firing(slos)
    summaries = sorted((slo_summary(s, now, firing[s.pk]) for s in slos), key=_worst_first)
    return {
        "t": now.timestamp(),
        "counts": {state: sum(1 for s in summaries if s["state"] == state) for state in STATES},
        "slos": summaries,
    }


# --- Detail ---------------------------------------------------------------------------------


def _covered(slo: Slo) -> list[Deployment]:
    """The deployments the SLO measures (none for storage reads)."""
    deployments = Deployment.objects.filter(serving([slo.tenant_id])).order_by("name")
    return [d for d in deployments if slo_selectors.covers(slo, d)]


def _budget_series(slo: Slo, now: datetime) -> list[dict[str, Any]]:
    start = window_start(slo.window, now)
    moments = _moments(start, now, CHART_POINTS)
    windows = {f"t{i}": (window_start(slo.window, t), t) for i, t in enumerate(moments)}
    counts = slo_selectors.slo_counts(slo, windows, now)
    return _budget_points(slo, moments, counts)


def _burn_series(slo: Slo, rules: list[BurnRule], since: datetime, now: datetime) -> dict[str, Any]:
    """Each rule's long-window burn rate at evenly spaced moments of [since, now]; None
    where its window held no events (a gap, not a zero)."""
    moments = _moments(since, now, CHART_POINTS)
    lengths = {duration_label(r.long): r.long for r in rules}
    windows = {
        f"{label}@{i}": (t - length, t)
        for label, length in lengths.items()
        for i, t in enumerate(moments)
    }
    counts = slo_selectors.slo_counts(slo, windows, now)
    return {
        "t": [t.timestamp() for t in moments],
        "series": {
            label: [
                None if (c := counts[f"{label}@{i}"]).total == 0 else c.burn_rate(slo.objective)
                for i in range(len(moments))
            ]
            for label in lengths
        },
    }


def _events(slo: Slo, resolution: int, since: datetime, now: datetime) -> list[dict[str, Any]]:
    """Good and total per bucket and revision, exactly as counted: each revision's counts
    against its own threshold while it was in force, so an old threshold's counts never
    pass for the new one's (a bucket spanning a change has a point for each)."""
    counted: dict[tuple[datetime, float | None], dict[str, Any]] = {}
    for revision in slo_selectors.revisions_in_period(slo, since, now):
        # a bucket spanning a change is the old revision's, as in `slo_counts` (`sli.tile`)
        start = since
        if revision.counts_from is not None:
            start = max(since, ceil_to(revision.counts_from, resolution))
        rows = slo_selectors.counted_against(slo, revision.threshold_seconds).filter(
            resolution=resolution, bucket__gte=start
        )
        if revision.ended_at is not None:
            rows = rows.filter(bucket__lt=ceil_to(revision.ended_at, resolution))
        for row in rows.values("bucket").annotate(good=Sum("good"), total=Sum("total")):
            # revisions sharing a threshold share rows: the later one owns them
            counted[(row["bucket"], revision.threshold_seconds)] = {
                "t": row["bucket"].timestamp(),
                "good": int(row["good"]),
                "total": int(row["total"]),
                "revision": revision.number,
            }
    return sorted(counted.values(), key=lambda p: (p["t"], p["revision"]))


def _percentiles(
    slo: Slo, deployments: list[Deployment], resolution: int, since: datetime
) -> list[dict[str, Any]]:
    """The SLI's p50/p90/p99 per bucket from the merged sketches of what the SLO measures."""
    if slo.sli not in LATENCY_SLIS:
        return []
    where = Q(deployment__isnull=True)
    if slo.sli != Sli.STORAGE_READ:
        where = Q(deployment__in=[d.pk for d in deployments])
    merged: dict[datetime, LatencySketch] = {}
    for bucket, blob in LatencyRollup.objects.filter(
        where, tenant_id=slo.tenant_id, metric=slo.sli, resolution=resolution, bucket__gte=since
    ).values_list("bucket", "sketch"):
        sketch = LatencySketch.from_bytes(bytes(blob))
        if bucket in merged:
            merged[bucket].merge(sketch)
        else:
            merged[bucket] = sketch
    return [
        {"t": bucket.timestamp(), **latency_summary(sketch)}
        for bucket, sketch in sorted(merged.items())
    ]


def _revision_text(slo: Slo, revision: SloRevision, before: SloRevision | None) -> str:
    """ "revision 2: TTFT <= 2 s (was 500 ms)": what the new definition changed."""

    def threshold(r: SloRevision) -> str:
        return "-" if r.threshold_seconds is None else seconds_text(r.threshold_seconds)

    parts = []
    for name, show in (
        ("threshold_seconds", threshold),
        ("objective", lambda r: f"{r.objective * 100:g} %"),
        ("window", lambda r: r.window.removeprefix("rolling_")),
    ):
        if before is None or getattr(before, name) != getattr(revision, name):
            was = f" (was {show(before)})" if before is not None else ""
            parts.append(f"{name.removesuffix('_seconds')} {show(revision)}{was}")
    return f"revision {revision.number}: " + (
        ", ".join(parts) or "what it measures changed, or restarted as it was"
    )


def _changes(
    slo: Slo, deployments: list[Deployment], since: datetime, full: bool
) -> list[dict[str, Any]]:
    """What changed around the SLO: its own creation and edits, and the desired-state
    revisions of the nodes serving it whose cause names its tenant or what it measures (all
    of them for platform admins; those the SLO's own edits caused are already listed). One
    entry per cause and moment, however many nodes."""
    found = []
    if slo.created_at >= since:
        found.append({"t": slo.created_at.timestamp(), "kind": "slo", "text": "SLO created"})
    revisions = list(slo.revisions.filter(started_at__gte=since, number__gt=1))
    previous = {
        r.number: r for r in slo.revisions.filter(number__in=[r.number - 1 for r in revisions])
    }
    for revision in revisions:
        found.append(
            {
                "t": revision.started_at.timestamp(),
                "kind": "slo",
                "text": _revision_text(slo, revision, previous.get(revision.number - 1)),
            }
        )
    edited = slo.updated_at - max(slo.created_at, slo.revision_started_at or slo.created_at)
    if edited > timedelta(seconds=1) and slo.updated_at >= since:
        found.append({"t": slo.updated_at.timestamp(), "kind": "slo", "text": "SLO edited"})
    nodes = Replica.objects.filter(deployment__in=deployments, node__isnull=False).values("node")
    hostnames = list(Node.objects.filter(pk__in=nodes).values_list("hostname", flat=True))
    own = f"SLO {slo.name} "
    names = [
        f"tenant {slo.tenant.slug} ",
        *(f"deployment {d.name}" for d in deployments),
        *hostnames,
    ]
    seen = set()
    for cause, created_at in (
        Revision.objects.filter(node__in=nodes, created_at__gte=since)
        .order_by("created_at")
        .values_list("cause", "created_at")
    ):
        key = (cause, int(created_at.timestamp()))
        text = f"{cause} "
        if key in seen or text.startswith(own) or not (full or any(n in text for n in names)):
            continue
        seen.add(key)
        found.append({"t": created_at.timestamp(), "kind": "revision", "text": cause})
    return sorted(found, key=lambda c: c["t"])


def slo_detail(slo: Slo, user: Any, now: datetime, range_s: int) -> dict[str, Any]:
    """The detail page: the summary, the budget over the SLO's window, and over the last
    `range_s` seconds the burn rates, the SLI's percentiles, good/total, alerts and changes."""
    rules = burn_rules(slo.window, now)
    resolution = resolution_for(range_s)
    since = floor_to(now - timedelta(seconds=range_s), resolution)
    deployments = _covered(slo)
    alerts = Alert.objects.filter(
        tenant_id=slo.tenant_id, labels__slo=slo.name, starts_at__lt=now
    ).filter(Q(ends_at__isnull=True) | Q(ends_at__gte=now - window_length(slo.window, now)))
    alerts = list(alerts.order_by("starts_at"))
    firing = [a for a in alerts if a.state == AlertState.FIRING]
    return {
        "slo": slo_summary(slo, now, firing),
        "t": now.timestamp(),
        "range_s": range_s,
        "resolution": resolution,
        "deployments": [{"id": d.pk, "name": d.name} for d in deployments],
        "budget": _budget_series(slo, now),
        "burn": {
            **_burn_series(slo, rules, since, now),
            "thresholds": [
                {"window": duration_label(r.long), "factor": r.factor, "severity": r.severity}
                for r in rules
            ],
        },
        "events": _events(slo, resolution, since, now),
        "percentiles": _percentiles(slo, deployments, resolution, since),
        "alerts": [_alert(a) for a in alerts],
        "changes": _changes(
            slo,
            deployments,
            now - window_length(slo.window, now),
            readable_tenant_ids(user) is None,
        ),
    }


def latency_thresholds(deployment: Deployment) -> list[dict[str, Any]]:
    """The latency SLOs of the deployment's owner that measure it, for its charts' lines."""
    return [
        {"metric": slo.sli, "seconds": slo.threshold_seconds, "label": f"SLO {slo.name}"}
        for slo in slo_selectors.slos_of_tenant(deployment.tenant_id)
        if slo.threshold_seconds is not None and slo_selectors.covers(slo, deployment)
    ]


# --- Fleet health ---------------------------------------------------------------------------


def fleet_health(user: Any, now: datetime) -> dict[str, Any]:
    """The roll-up above the node table: pages firing, SLOs at risk or worse, nodes not ready."""
    overview = slo_overview(user, now)
    tenant_ids = readable_tenant_ids(user)
    pages = Alert.objects.filter(state=AlertState.FIRING, severity=Severity.PAGE)
    if tenant_ids is not None:
        pages = pages.filter(tenant_id__in=tenant_ids)
    nodes = visible_nodes(user)
    return {
        "t": now.timestamp(),
        "pages_firing": pages.count(),
        "slos": len(overview["slos"]),
        "slo_counts": overview["counts"],
        "worst": overview["slos"][:5],
        "nodes": nodes.count(),
        "nodes_not_ready": nodes.exclude(status=NodeStatus.READY).count(),
    }

"""All SLO mutations: definitions (and their thresholds on the nodes), OpenSLO import, and
evaluation, which records each SLO's state and fires and resolves its alerts.

An SLO change renders the desired state of the nodes that serve it, so the workers there
start (or stop) counting good/total against its threshold. Evaluation is level-triggered
and idempotent: it compares what should fire now with what its last run left firing and
signals the differences only (`alert_changed`, which the alerts app handles).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Case, Q, When
from django.utils import timezone

from controlplane.core import services as core
from controlplane.fleet import selectors as fleet_selectors
from controlplane.fleet.models import Deployment
from controlplane.fleet.services import reconcile_fleet
from controlplane.slo import openslo, selectors, signals
from controlplane.slo.choices import AlertName, Scope, Sli
from controlplane.slo.models import Slo, SloStatus
from controlplane.slo.sli import Counts, burn_rules, duration_label, window_label, window_start
from controlplane.storage.models import Volume

# --- Definitions --------------------------------------------------------------------------


def _roll_out(slo: Slo, cause: str) -> None:
    """Render the nodes that serve the SLO's tenant (and, for storage reads, hold its volumes)."""
    nodes: list[Any] = []
    if slo.sli == Sli.STORAGE_READ:
        nodes = list(
            Volume.objects.filter(tenant_id=slo.tenant_id).values_list("pool__node_id", flat=True)
        )
    reconcile_fleet(cause=cause, tenants=[slo.tenant_id], nodes=nodes)


@transaction.atomic
def create_slo(**fields: Any) -> Slo:
    slo = core.create(Slo, **fields)
    SloStatus.objects.create(slo=slo)
    _roll_out(slo, f"SLO {slo.name} created")
    return slo


@transaction.atomic
def update_slo(slo: Slo, **changes: Any) -> Slo:
    was_storage = slo.sli == Sli.STORAGE_READ
    core.update(slo, **changes)
    _roll_out(slo, f"SLO {slo.name} changed")
    if was_storage and slo.sli != Sli.STORAGE_READ:  # its old nodes drop the threshold too
        reconcile_fleet(
            cause=f"SLO {slo.name} changed",
            nodes=Volume.objects.filter(tenant_id=slo.tenant_id).values_list(
                "pool__node_id", flat=True
            ),
        )
    return slo


@transaction.atomic
def delete_slo(slo: Slo, now: datetime | None = None) -> None:
    status = SloStatus.objects.select_for_update().filter(slo=slo).first()
    if status is not None:
        _sync(slo, status.firing, {}, {}, now or timezone.now())
    tenant_id, sli, name = slo.tenant_id, slo.sli, slo.name
    nodes: list[Any] = []
    if sli == Sli.STORAGE_READ:
        nodes = list(
            Volume.objects.filter(tenant_id=tenant_id).values_list("pool__node_id", flat=True)
        )
    slo.delete()
    reconcile_fleet(cause=f"SLO {name} deleted", tenants=[tenant_id], nodes=nodes)


@transaction.atomic
def import_openslo(*, tenant: Any, text: str) -> tuple[Slo, bool]:
    """Create the SLO an OpenSLO v1 document describes, or update the tenant's SLO of that
    name; returns it and whether it is new. Errors name the document path."""
    fields = openslo.parse(text)
    deployment_name = fields.pop("deployment")
    fields["deployment"] = None
    if deployment_name is not None:
        fields["deployment"] = (  # its own first, then one shared with it
            Deployment.objects.filter(fleet_selectors.serving([tenant.pk]), name=deployment_name)
            .order_by(Case(When(tenant=tenant, then=0), default=1), "tenant__slug")
            .first()
        )
        if fields["deployment"] is None:
            raise ValidationError(
                {
                    openslo.FIELD_PATHS["deployment"]: [
                        f"No deployment named {deployment_name!r} serves the tenant."
                    ]
                }
            )
    existing = Slo.objects.filter(tenant=tenant, name=fields["name"]).first()
    try:
        if existing is None:
            return create_slo(tenant=tenant, **fields), True
        return update_slo(existing, **fields), False
    except ValidationError as exc:
        raise openslo.as_paths(exc) from None


# --- Evaluation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Firing:
    labels: dict[str, str]
    annotations: dict[str, str]
    severity: str


def _key(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def evaluate(slo_ids: Iterable[Any] | None = None, *, now: datetime | None = None) -> int:
    """Evaluate the SLOs named (all when None) that were not evaluated within the debounce
    interval; returns how many were. Concurrent callers skip rows another one holds."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.SLO_EVALUATE_DEBOUNCE_S)
    with transaction.atomic():
        statuses = SloStatus.objects.select_for_update(skip_locked=True, of=("self",)).filter(
            Q(evaluated_at__isnull=True) | Q(evaluated_at__lte=cutoff)
        )
        if slo_ids is not None:
            statuses = statuses.filter(slo_id__in=list(slo_ids))
        claimed = list(statuses.select_related("slo__tenant", "slo__deployment"))
        if not claimed:
            return 0
        serving = selectors.deployments_with_replicas({s.slo.tenant_id for s in claimed})
        for status in claimed:
            _evaluate_one(status, serving[status.slo.tenant_id], now)
    return len(claimed)


def _evaluate_one(status: SloStatus, serving: list[Deployment], now: datetime) -> None:
    slo = status.slo
    rules = burn_rules(slo.window, now)
    windows = {"slo": (window_start(slo.window, now), now)}
    for rule in rules:
        for length in (rule.long, rule.short):
            windows[duration_label(length)] = (now - length, now)
    counts = selectors.slo_counts(slo, windows, now)
    whole = counts.pop("slo")
    status.evaluated_at = now
    status.good, status.total = whole.good, whole.total
    status.achieved_ratio = whole.achieved()
    status.budget_remaining_ratio = whole.budget_remaining(slo.objective)
    status.burn_rates = {label: c.burn_rate(slo.objective) for label, c in counts.items()}

    wanted: dict[str, Firing] = {}
    calm: dict[str, dict[str, str]] = {}
    base = {"tenant": slo.tenant.slug, "slo": slo.name}
    if slo.scope == Scope.DEPLOYMENT and slo.deployment is not None:
        base["deployment"] = slo.deployment.name
    min_events = settings.SLO_ALERT_MIN_EVENTS
    for rule in rules:
        long, short = counts[duration_label(rule.long)], counts[duration_label(rule.short)]
        rate_long, rate_short = long.burn_rate(slo.objective), short.burn_rate(slo.objective)
        labels = {"alertname": rule.alertname, **base, "window": duration_label(rule.long)}
        burning = rate_long >= rule.factor and rate_short >= rule.factor
        annotations = {
            "summary": f"SLO {slo.name} is burning its error budget at "
            f"{rate_long:.1f}x (threshold {rule.factor}x)"
            if burning
            else f"SLO {slo.name} burns its error budget under {rule.factor}x again",
            "description": f"Burn rate {rate_long:.2f}x over {duration_label(rule.long)} "
            f"and {rate_short:.2f}x over {duration_label(rule.short)}; "
            f"{whole.budget_remaining(slo.objective):.1%} of the "
            f"{window_label(slo.window)} budget remains.",
            "slo_id": str(slo.pk),
        }
        if burning and long.total >= min_events:
            wanted[_key(labels)] = Firing(labels, annotations, rule.severity)
        else:
            calm[_key(labels)] = annotations
    if whole.total >= min_events and status.budget_remaining_ratio <= 0:
        labels = {
            "alertname": AlertName.BUDGET_EXHAUSTED,
            **base,
            "window": window_label(slo.window),
        }
        wanted[_key(labels)] = Firing(
            labels,
            {
                "summary": f"SLO {slo.name} has spent its {window_label(slo.window)} error budget",
                "description": f"{_pct(whole)} of {whole.total} events were good against an "
                f"objective of {slo.objective:.3%}.",
                "slo_id": str(slo.pk),
            },
            "ticket",
        )
    wanted.update(_no_data(slo, serving, now))
    status.firing = _sync(slo, status.firing, wanted, calm, now)
    status.save()


def _pct(counts: Counts) -> str:
    achieved = counts.achieved()
    return "none" if achieved is None else f"{achieved:.3%}"


def _no_data(slo: Slo, serving: list[Deployment], now: datetime) -> dict[str, Firing]:
    """Deployments the SLO covers that have replicas but sent no events for a while."""
    quiet = timedelta(seconds=settings.SLO_NO_DATA_AFTER_S)
    since = now - quiet
    candidates = [
        d
        for d in serving
        if selectors.covers(slo, d) and max(d.created_at, slo.created_at) <= since
    ]
    if not candidates:
        return {}
    totals = selectors.deployment_totals(slo, since, now, now)
    found = {}
    for deployment in candidates:
        if totals.get(deployment.pk, 0) == 0:
            labels = {
                "alertname": AlertName.NO_DATA,
                "tenant": slo.tenant.slug,
                "slo": slo.name,
                "deployment": deployment.name,
                "window": duration_label(quiet),
            }
            found[_key(labels)] = Firing(
                labels,
                {
                    "summary": f"No {slo.sli} events from deployment {deployment.name} "
                    f"for {duration_label(quiet)}",
                    "description": "The deployment has placed replicas, but its workers "
                    "reported no events for this SLO.",
                    "slo_id": str(slo.pk),
                },
                "ticket",
            )
    return found


def _sync(
    slo: Slo,
    firing: dict[str, Any],
    wanted: dict[str, Firing],
    calm: dict[str, dict[str, str]],
    now: datetime,
) -> dict[str, Any]:
    """Fire what is newly wanted, resolve what no longer is; returns what now fires. A
    resolved burn-rate alert says the rates it resolved at (`calm`), not its last firing
    ones."""
    for key, alert in wanted.items():
        if key not in firing:
            signals.alert_changed.send(
                sender=Slo,
                tenant=slo.tenant,
                labels=alert.labels,
                annotations=alert.annotations,
                severity=alert.severity,
                firing=True,
                now=now,
            )
    for key, previous in firing.items():
        if key not in wanted:
            signals.alert_changed.send(
                sender=Slo,
                tenant=slo.tenant,
                labels=previous["labels"],
                annotations=calm.get(key, previous["annotations"]),
                severity=previous["severity"],
                firing=False,
                now=now,
            )
    return {
        key: {"labels": a.labels, "annotations": a.annotations, "severity": a.severity}
        for key, a in wanted.items()
    }

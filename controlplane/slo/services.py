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
from controlplane.slo.models import DEFINITION, Slo, SloRevision, SloStatus
from controlplane.slo.sli import (
    BurnRule,
    Counts,
    burn_rules,
    duration_label,
    window_label,
    window_start,
)
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


def _revision(slo: Slo, number: int, started_at: datetime) -> SloRevision:
    return SloRevision.objects.create(
        slo=slo,
        number=number,
        threshold_seconds=slo.threshold_seconds,
        objective=slo.objective,
        window=slo.window,
        started_at=started_at,
    )


@transaction.atomic
def create_slo(**fields: Any) -> Slo:
    slo = core.create(Slo, **fields)
    SloStatus.objects.create(slo=slo)
    _revision(slo, 1, slo.created_at)
    _roll_out(slo, f"SLO {slo.name} created")
    return slo


@transaction.atomic
def update_slo(
    slo: Slo, *, now: datetime | None = None, new_revision: bool = False, **changes: Any
) -> Slo:
    """Change an SLO. A new threshold, objective or window (or `new_revision`) starts a new
    revision at `now`: the old one's counts stay its own, and its alerts resolve."""
    was_storage = slo.sli == Sli.STORAGE_READ
    before = [getattr(slo, name) for name in DEFINITION]
    core.update(slo, **changes)
    if new_revision or before != [getattr(slo, name) for name in DEFINITION]:
        _start_revision(slo, now or timezone.now())
    _roll_out(slo, f"SLO {slo.name} changed")
    if was_storage and slo.sli != Sli.STORAGE_READ:  # its old nodes drop the threshold too
        reconcile_fleet(
            cause=f"SLO {slo.name} changed",
            nodes=Volume.objects.filter(tenant_id=slo.tenant_id).values_list(
                "pool__node_id", flat=True
            ),
        )
    return slo


def _start_revision(slo: Slo, now: datetime) -> None:
    """Close the revision in force and start the next from the SLO as it is now, with a
    fresh status: nothing the old definition counted or fired carries over."""
    SloRevision.objects.filter(slo=slo, ended_at__isnull=True).update(ended_at=now)
    slo.revision += 1
    slo.revision_started_at = now
    slo.save(update_fields=["revision", "revision_started_at", "updated_at"])
    _revision(slo, slo.revision, now)
    status = SloStatus.objects.select_for_update().filter(slo=slo).first()
    if status is not None:
        _sync(slo, status.firing, {}, {}, now, hold=timedelta(0))
        fresh = SloStatus(slo=slo)
        fresh.save(force_update=True)
        slo.status = fresh


@transaction.atomic
def delete_slo(slo: Slo, now: datetime | None = None) -> None:
    status = SloStatus.objects.select_for_update().filter(slo=slo).first()
    if status is not None:
        _sync(slo, status.firing, {}, {}, now or timezone.now(), hold=timedelta(0))
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


def _burn_alerts(
    slo: Slo, rules: list[BurnRule], counts: dict[str, Counts], whole: Counts
) -> tuple[dict[str, Firing], dict[str, dict[str, str]]]:
    """One alert per severity, its windows folded together (as Pyrra and the workbook's
    rules do): it fires while any of its window pairs burns at its factor or more (with
    enough events in the long window). Returns the firing ones and every one's annotations
    as of now, so that a resolving alert says the rates it resolved at."""
    wanted: dict[str, Firing] = {}
    current: dict[str, dict[str, str]] = {}
    min_events = settings.SLO_ALERT_MIN_EVENTS
    for severity in dict.fromkeys(rule.severity for rule in rules):
        mine = [rule for rule in rules if rule.severity == severity]
        rates = []
        for rule in mine:
            long, short = counts[duration_label(rule.long)], counts[duration_label(rule.short)]
            rate_long, rate_short = long.burn_rate(slo.objective), short.burn_rate(slo.objective)
            burning = min(rate_long, rate_short) >= rule.factor and long.total >= min_events
            rates.append((rule, rate_long, rate_short, burning))
        labels = {"alertname": mine[0].alertname, **_base_labels(slo)}
        worst = max(rates, key=lambda r: min(r[1], r[2]) / r[0].factor)
        rule, rate_long, _, _ = worst
        firing = any(r[3] for r in rates)
        summary = (
            f"SLO {slo.name} is burning its error budget at {rate_long:.1f}x over "
            f"{duration_label(rule.long)} (threshold {rule.factor:g}x)"
            if firing
            else f"SLO {slo.name} burns its error budget under its {severity} thresholds "
            f"({rate_long:.1f}x over {duration_label(rule.long)})"
        )
        windows = "; ".join(
            f"{r.factor:g}x: {rl:.2f}x over {duration_label(r.long)} and {rs:.2f}x over "
            f"{duration_label(r.short)}"
            for r, rl, rs, _ in rates
        )
        annotations = {
            "summary": summary,
            "description": f"Burn rates against each threshold: {windows}. "
            f"{whole.budget_remaining(slo.objective):.1%} of the {window_label(slo.window)} "
            f"budget of revision {slo.revision} remains.",
            "slo_id": str(slo.pk),
        }
        current[_key(labels)] = annotations
        if firing:
            wanted[_key(labels)] = Firing(labels, annotations, severity)
    return wanted, current


def _base_labels(slo: Slo) -> dict[str, str]:
    base = {"tenant": slo.tenant.slug, "slo": slo.name}
    if slo.scope == Scope.DEPLOYMENT and slo.deployment is not None:
        base["deployment"] = slo.deployment.name
    return base


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

    wanted, current = _burn_alerts(slo, rules, counts, whole)
    if whole.total >= settings.SLO_ALERT_MIN_EVENTS and status.budget_remaining_ratio <= 0:
        labels = {
            "alertname": AlertName.BUDGET_EXHAUSTED,
            **_base_labels(slo),
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
    hold = timedelta(seconds=settings.ALERTS_KEEP_FIRING_FOR_S)
    status.firing = _sync(slo, status.firing, wanted, current, now, hold=hold)
    status.save()


def _pct(counts: Counts) -> str:
    achieved = counts.achieved()
    return "none" if achieved is None else f"{achieved:.3%}"


def _no_data(slo: Slo, serving: list[Deployment], now: datetime) -> dict[str, Firing]:
    """Deployments the SLO covers that served it events earlier in its window, and have
    replicas, but sent none for a while: a deployment that was never used is idle, not
    silent."""
    quiet = timedelta(seconds=settings.SLO_NO_DATA_AFTER_S)
    since = now - quiet
    candidates = [
        d
        for d in serving
        if selectors.covers(slo, d) and max(d.created_at, slo.created_at) <= since
    ]
    if not candidates:
        return {}
    recent = selectors.deployment_totals(slo, since, now, now)
    before = selectors.deployment_totals(slo, window_start(slo.window, now), since, now)
    found = {}
    for deployment in candidates:
        if recent.get(deployment.pk, 0) == 0 and before.get(deployment.pk, 0) > 0:
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
                    "description": "The deployment served events for this SLO earlier in "
                    "its window and has placed replicas, but its workers reported none since.",
                    "slo_id": str(slo.pk),
                },
                "ticket",
            )
    return found


def _sync(
    slo: Slo,
    firing: dict[str, Any],
    wanted: dict[str, Firing],
    current: dict[str, dict[str, str]],
    now: datetime,
    *,
    hold: timedelta,
) -> dict[str, Any]:
    """Tell every alert's state as of now; returns what still fires. Like Prometheus'
    `keep_firing_for`, an alert whose condition turned false keeps firing (`calm_since`
    notes since when) until it has stayed false for `hold`, so a rate hovering at a
    threshold fires once and resolves once. Firing alerts are told every evaluation, so
    their annotations always carry the latest values (`current`)."""
    still: dict[str, Any] = {}
    for key, alert in wanted.items():
        _tell(slo, alert.labels, alert.annotations, alert.severity, True, now)
        still[key] = {
            "labels": alert.labels,
            "annotations": alert.annotations,
            "severity": alert.severity,
            "calm_since": None,
        }
    for key, previous in firing.items():
        if key in wanted:
            continue
        calm_since = previous.get("calm_since") or now.isoformat()
        annotations = current.get(key, previous["annotations"])
        resolving = now - datetime.fromisoformat(calm_since) >= hold
        _tell(slo, previous["labels"], annotations, previous["severity"], not resolving, now)
        if not resolving:
            still[key] = {**previous, "annotations": annotations, "calm_since": calm_since}
    return still


def _tell(
    slo: Slo,
    labels: dict[str, str],
    annotations: dict[str, str],
    severity: str,
    firing: bool,
    now: datetime,
) -> None:
    signals.alert_changed.send(
        sender=Slo,
        tenant=slo.tenant,
        labels=labels,
        annotations=annotations,
        severity=severity,
        firing=firing,
        now=now,
    )

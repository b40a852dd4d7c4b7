"""SLO evaluation as Celery tasks: after telemetry commits, and every 30 s (beat) so that
silence is noticed too."""

from __future__ import annotations

from celery import shared_task

from controlplane.slo import services


@shared_task(name="slo.evaluate")
def evaluate(slo_ids: list[str]) -> int:
    """Sent by telemetry ingest for the SLOs whose rollups a commit touched; SLOs evaluated
    within the last SLO_EVALUATE_DEBOUNCE_S are skipped, so a burst costs one run."""
    return services.evaluate(slo_ids)


@shared_task(name="slo.evaluate_all")
def evaluate_all() -> int:
    return services.evaluate(None)

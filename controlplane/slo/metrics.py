"""SLO state for Prometheus: a custom collector that reads the latest evaluations.

`SloConfig.ready()` registers it in the control plane's registry (telemetry's `REGISTRY`);
each scrape costs one query and computes nothing, since evaluation already stored the state.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controlplane.slo.models import Slo


class SloCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        labels = ["tenant", "slo"]
        objective = GaugeMetricFamily(
            "tailguard_slo_objective_ratio",
            "The share of good events an SLO aims for.",
            labels=labels,
        )
        achieved = GaugeMetricFamily(
            "tailguard_slo_achieved_ratio",
            "The share of good events so far in the SLO's window (absent while it has none).",
            labels=labels,
        )
        budget = GaugeMetricFamily(
            "tailguard_slo_error_budget_remaining_ratio",
            "Error budget left in the SLO's window: 1 is untouched, below 0 overspent.",
            labels=labels,
        )
        burn = GaugeMetricFamily(
            "tailguard_slo_burn_rate",
            "How many times faster than allowed the budget burns over the last `window`.",
            labels=[*labels, "window"],
        )
        rows = Slo.objects.values_list(
            "tenant__slug",
            "name",
            "objective",
            "status__evaluated_at",
            "status__achieved_ratio",
            "status__budget_remaining_ratio",
            "status__burn_rates",
        ).order_by("tenant__slug", "name")
        for tenant, name, target, evaluated_at, ratio, remaining, rates in rows:
            objective.add_metric([tenant, name], target)
            if evaluated_at is None:
                continue
            if ratio is not None:
                achieved.add_metric([tenant, name], ratio)
            budget.add_metric([tenant, name], remaining)
            for window, rate in sorted(rates.items()):
                burn.add_metric([tenant, name, window], rate)
        yield from (objective, achieved, budget, burn)

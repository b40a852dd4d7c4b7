"""Shapes of the SLO console's snapshots (see `console.selectors`), for the OpenAPI schema."""

from __future__ import annotations

from rest_framework import serializers

from controlplane.alerts.choices import AlertState, Severity
from controlplane.console.selectors import STATES
from controlplane.slo.choices import Scope, Sli, Window

RANGE_DEFAULT_S = 86400


class RangeQuerySerializer(serializers.Serializer):
    range = serializers.IntegerField(
        required=False,
        default=RANGE_DEFAULT_S,
        min_value=300,
        max_value=35 * 86400,
        help_text="How far back the burn-rate, percentile and event charts go, in seconds.",
    )


class TenantQuerySerializer(serializers.Serializer):
    tenant = serializers.UUIDField(required=False, help_text="Only this tenant's SLOs.")


class PointSerializer(serializers.Serializer):
    t = serializers.FloatField(help_text="Unix seconds.")
    value = serializers.FloatField(allow_null=True, help_text="None: no events in the window.")


class TenantRefSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    slug = serializers.CharField()
    name = serializers.CharField()


class BurnRuleSerializer(serializers.Serializer):
    severity = serializers.ChoiceField(choices=Severity.choices)
    factor = serializers.FloatField(help_text="Both windows at or over it: the alert fires.")
    long_window = serializers.CharField()
    short_window = serializers.CharField()
    long_rate = serializers.FloatField()
    short_rate = serializers.FloatField()
    burning = serializers.BooleanField()


class SloAlertSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    alertname = serializers.CharField()
    severity = serializers.ChoiceField(choices=Severity.choices)
    state = serializers.ChoiceField(choices=AlertState.choices)
    window = serializers.CharField()
    summary = serializers.CharField()
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField(allow_null=True)


class SloSummarySerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()
    display_name = serializers.CharField()
    tenant = TenantRefSerializer()
    sli = serializers.ChoiceField(choices=Sli.choices)
    threshold_seconds = serializers.FloatField(allow_null=True)
    objective = serializers.FloatField()
    window = serializers.ChoiceField(choices=Window.choices)
    revision = serializers.IntegerField(
        help_text="The definition in force; a threshold, objective or window change starts "
        "the next, and the figures here count only its events."
    )
    scope = serializers.ChoiceField(choices=Scope.choices)
    deployment = serializers.CharField(allow_null=True)
    model_name = serializers.CharField(allow_null=True)
    updated_at = serializers.DateTimeField()
    state = serializers.ChoiceField(choices=STATES)
    good = serializers.IntegerField(help_text="Good events in the SLO's window, exact.")
    total = serializers.IntegerField()
    achieved_ratio = serializers.FloatField(allow_null=True, help_text="None: no events.")
    budget_remaining_ratio = serializers.FloatField(help_text="Negative once overspent.")
    budget_sparkline = PointSerializer(many=True, help_text="Budget remaining over the window.")
    burn_rates = BurnRuleSerializer(many=True)
    firing = SloAlertSerializer(many=True)


class OverviewSerializer(serializers.Serializer):
    t = serializers.FloatField()
    counts = serializers.DictField(child=serializers.IntegerField(), help_text="SLOs per state.")
    slos = SloSummarySerializer(many=True, help_text="Worst first.")


class DeploymentRefSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    name = serializers.CharField()


class BurnThresholdSerializer(serializers.Serializer):
    window = serializers.CharField()
    factor = serializers.FloatField()
    severity = serializers.ChoiceField(choices=Severity.choices)


class BurnSeriesSerializer(serializers.Serializer):
    t = serializers.ListField(child=serializers.FloatField())
    series = serializers.DictField(
        child=serializers.ListField(child=serializers.FloatField(allow_null=True)),
        help_text="Burn rate per long window; null where the window held no events.",
    )
    thresholds = BurnThresholdSerializer(many=True)


class EventPointSerializer(serializers.Serializer):
    t = serializers.FloatField()
    good = serializers.IntegerField()
    total = serializers.IntegerField()
    revision = serializers.IntegerField(
        help_text="The SLO revision whose threshold these events were counted against."
    )


class PercentilePointSerializer(serializers.Serializer):
    t = serializers.FloatField()
    count = serializers.IntegerField()
    p50 = serializers.FloatField(allow_null=True)
    p90 = serializers.FloatField(allow_null=True)
    p99 = serializers.FloatField(allow_null=True)


class ChangeSerializer(serializers.Serializer):
    t = serializers.FloatField()
    kind = serializers.ChoiceField(choices=["slo", "revision"])
    text = serializers.CharField()


class SloDetailSerializer(serializers.Serializer):
    slo = SloSummarySerializer()
    t = serializers.FloatField()
    range_s = serializers.IntegerField()
    resolution = serializers.IntegerField(help_text="Seconds per event and percentile point.")
    deployments = DeploymentRefSerializer(many=True, help_text="What the SLO measures.")
    budget = PointSerializer(many=True, help_text="Budget remaining over the SLO's window.")
    burn = BurnSeriesSerializer()
    events = EventPointSerializer(many=True)
    percentiles = PercentilePointSerializer(many=True)
    alerts = SloAlertSerializer(many=True, help_text="Alert episodes within the SLO's window.")
    changes = ChangeSerializer(many=True, help_text="SLO edits and revisions, oldest first.")


class FleetHealthSerializer(serializers.Serializer):
    t = serializers.FloatField()
    pages_firing = serializers.IntegerField()
    slos = serializers.IntegerField()
    slo_counts = serializers.DictField(child=serializers.IntegerField())
    worst = SloSummarySerializer(many=True, help_text="The five worst SLOs.")
    nodes = serializers.IntegerField()
    nodes_not_ready = serializers.IntegerField()

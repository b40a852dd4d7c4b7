"""Serializers for SLO definitions and their latest evaluated state."""

from __future__ import annotations

from rest_framework import serializers

from controlplane.core.api import StrictSerializer
from controlplane.fleet.api.serializers import ServingDeploymentField
from controlplane.slo.models import Slo, SloStatus
from controlplane.storage.api.serializers import CreateOnlyMixin
from controlplane.tenancy.api.fields import WritableTenantField


class SloStatusSerializer(serializers.ModelSerializer):
    firing = serializers.SerializerMethodField(help_text="Labels of the alerts firing now.")

    class Meta:
        model = SloStatus
        fields = [
            "evaluated_at",
            "good",
            "total",
            "achieved_ratio",
            "budget_remaining_ratio",
            "burn_rates",
            "firing",
        ]
        read_only_fields = fields

    def get_firing(self, status: SloStatus) -> list[dict[str, str]]:
        return [alert["labels"] for alert in status.firing.values()]


class SloSerializer(CreateOnlyMixin, StrictSerializer):
    tenant = WritableTenantField()
    deployment = ServingDeploymentField(
        allow_null=True,
        required=False,
        help_text="scope deployment: the deployment measured.",
    )
    status = SloStatusSerializer(read_only=True)

    class Meta:
        model = Slo
        fields = [
            "id",
            "tenant",
            "name",
            "display_name",
            "description",
            "scope",
            "deployment",
            "model_name",
            "sli",
            "threshold_seconds",
            "measured_at",
            "objective",
            "window",
            "revision",
            "revision_started_at",
            "status",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "revision", "revision_started_at", "created_at", "updated_at"]

"""Service level objectives (shaped like OpenSLO v1) and the state their evaluation leaves.

An SLO's events are the exact good/total counts the inference workers keep against its
threshold (telemetry `SloRollup` rows carry its id and the threshold counted against).
Its definition (threshold, objective, window) is versioned: each change starts an
`SloRevision`, and a revision owns only the counts made under its threshold since it
started, so nothing measured under an old definition is ever relabelled. `SloStatus`
holds the latest evaluation, which the Prometheus collector and the API read without
recomputing.
"""

from __future__ import annotations

from datetime import datetime

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from controlplane.core.models import TenantOwnedModel
from controlplane.slo.choices import MeasuredAt, Scope, Sli, Window
from controlplane.tenancy.models import slug_validator

MAX_OBJECTIVE = 0.99999


class Slo(TenantOwnedModel):
    """An objective: `objective` of the events in `window` meet `sli` (under the threshold)."""

    name = models.CharField(max_length=63, validators=[slug_validator])
    display_name = models.CharField(max_length=200, blank=True)
    description = models.TextField(blank=True)
    scope = models.CharField(max_length=16, choices=Scope.choices, default=Scope.TENANT)
    deployment = models.ForeignKey(
        "fleet.Deployment",
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="slos",
        help_text="scope deployment: the one deployment measured.",
    )
    model_name = models.CharField(
        max_length=128,
        blank=True,
        help_text="scope model: every deployment of the tenant serving this model name.",
    )
    sli = models.CharField(max_length=16, choices=Sli.choices)
    threshold_seconds = models.FloatField(
        null=True,
        blank=True,
        validators=[MinValueValidator(0.000001)],
        help_text="A request is good at or under this latency; empty for availability.",
    )
    measured_at = models.CharField(
        max_length=16,
        choices=MeasuredAt.choices,
        default=MeasuredAt.WORKER,
        help_text="Where requests are counted: at the worker that served them, or at the "
        "gateway clients reached (its queueing included); storage reads, at the node.",
    )
    objective = models.FloatField(
        validators=[MinValueValidator(0.5), MaxValueValidator(MAX_OBJECTIVE)],
        help_text="The share of good events aimed for, e.g. 0.99.",
    )
    window = models.CharField(max_length=16, choices=Window.choices, default=Window.ROLLING_30D)
    revision = models.PositiveIntegerField(default=1, editable=False)
    revision_started_at = models.DateTimeField(
        null=True,
        editable=False,
        help_text="When the definition in force started (empty for the first): its counts "
        "begin here.",
    )

    class Meta:
        ordering = ["tenant__slug", "name"]
        verbose_name = "SLO"
        constraints = [
            models.UniqueConstraint(fields=["tenant", "name"], name="slo_name_per_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}/{self.name}"

    def clean(self) -> None:
        errors: dict[str, list[str]] = {}
        if self.sli == Sli.AVAILABILITY and self.threshold_seconds is not None:
            errors["threshold_seconds"] = [
                "Availability counts successes; leave the threshold empty."
            ]
        if self.sli and self.sli != Sli.AVAILABILITY and self.threshold_seconds is None:
            errors["threshold_seconds"] = [
                f"A {self.sli} SLO needs a latency threshold in seconds."
            ]
        if self.scope == Scope.DEPLOYMENT:
            if self.deployment_id is None:
                errors["deployment"] = ["Scope deployment names the deployment."]
            elif not (
                self.deployment.tenant_id == self.tenant_id
                or self.deployment.shared_with.filter(pk=self.tenant_id).exists()
            ):
                errors["deployment"] = [
                    "The deployment belongs to another tenant and is not shared with this one."
                ]
        elif self.deployment_id is not None:
            errors["deployment"] = ["Only scope deployment names a deployment."]
        if self.scope == Scope.MODEL and not self.model_name:
            errors["model_name"] = ["Scope model names the model."]
        if self.scope != Scope.MODEL and self.model_name:
            errors["model_name"] = ["Only scope model names a model."]
        if self.sli == Sli.STORAGE_READ and self.measured_at != MeasuredAt.WORKER:
            errors["measured_at"] = ["Storage reads are measured by the node's agent."]
        if self.sli == Sli.STORAGE_READ and self.scope != Scope.TENANT:
            errors["scope"] = [
                "Storage reads are measured per node, not per deployment: use scope tenant."
            ]
        if errors:
            raise ValidationError(errors)


DEFINITION = (
    "sli",
    "scope",
    "deployment_id",
    "model_name",
    "threshold_seconds",
    "measured_at",
    "objective",
    "window",
)
"""The fields whose change starts a new revision: what is measured, where, against what."""


class SloRevision(models.Model):
    """One definition of an SLO and when it was in force: [started_at, ended_at)."""

    slo = models.ForeignKey(Slo, on_delete=models.CASCADE, related_name="revisions")
    number = models.PositiveIntegerField()
    threshold_seconds = models.FloatField(null=True, blank=True)
    objective = models.FloatField()
    window = models.CharField(max_length=16, choices=Window.choices)
    started_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["slo", "number"]
        constraints = [
            models.UniqueConstraint(fields=["slo", "number"], name="slo_revision_number")
        ]

    def __str__(self) -> str:
        return f"{self.slo_id} r{self.number}"

    @property
    def counts_from(self) -> datetime | None:
        """Where its counts begin: the first revision owns every count under its threshold
        (none can predate the SLO), later ones only those since they started."""
        return None if self.number == 1 else self.started_at


class SloStatus(models.Model):
    """The latest evaluation of one SLO; `firing` maps alert keys to their labels."""

    slo = models.OneToOneField(
        Slo, on_delete=models.CASCADE, primary_key=True, related_name="status"
    )
    evaluated_at = models.DateTimeField(null=True, blank=True)
    good = models.BigIntegerField(default=0)
    total = models.BigIntegerField(default=0)
    achieved_ratio = models.FloatField(null=True, blank=True)
    budget_remaining_ratio = models.FloatField(default=1.0)
    burn_rates = models.JSONField(default=dict, blank=True, help_text="Burn rate per window label.")
    firing = models.JSONField(default=dict, blank=True)

    class Meta:
        verbose_name = "SLO status"
        verbose_name_plural = "SLO statuses"

    def __str__(self) -> str:
        return f"status of {self.slo_id}"

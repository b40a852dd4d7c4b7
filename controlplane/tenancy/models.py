"""Tenants and the people and keys that act for them."""

from __future__ import annotations

import math
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models

from agent.protocol import TenantServing
from controlplane.core.choices import Role
from controlplane.core.models import BaseModel, HashedSecret, TenantOwnedModel
from controlplane.tenancy.choices import WORKER_PRIORITY, PriorityClass

slug_validator = RegexValidator(
    r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$",
    "Use 1-63 lowercase letters, digits and hyphens, starting and ending with a letter or digit.",
)


class Tenant(BaseModel):
    slug = models.CharField(max_length=63, unique=True, validators=[slug_validator])
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    is_active = models.BooleanField(default=True)
    max_gpus = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Most GPUs the tenant's placed replicas may hold; empty means unlimited.",
    )
    max_replicas = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Most replicas of the tenant placed at once; empty means unlimited.",
    )

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


QUOTA_FIELDS = ("max_gpus", "max_replicas")


class Membership(TenantOwnedModel):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.VIEWER)

    class Meta:
        ordering = ["tenant__slug", "user__username"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "user"], name="one_membership_per_tenant")
        ]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant} ({self.role})"


class ApiToken(HashedSecret):
    """Acts as its user on the REST API, for automation."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    expires_at = models.DateTimeField(null=True, blank=True)


class InferenceKey(HashedSecret):
    """Names a tenant to the inference workers (`Authorization: Bearer <key>`)."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="inference_keys")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )


def validate_positive_finite(value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ValidationError("Must be a number greater than 0.")


class TenantPolicy(BaseModel):
    """How the data plane treats one tenant: its share and class on inference workers, the
    limits workers enforce on it, and the limits storage engines put on its volumes.

    Created on demand; a tenant without one runs on the defaults (`TenantPolicy.defaults`),
    which limit nothing.
    """

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="policy")
    weight = models.FloatField(
        default=1.0,
        validators=[validate_positive_finite, MaxValueValidator(1e6)],
        help_text="Share of a worker under contention, relative to the other tenants on it.",
    )
    priority_class = models.CharField(
        max_length=8,
        choices=PriorityClass.choices,
        default=PriorityClass.NORMAL,
        help_text="Higher classes are admitted first and may pause lower ones' requests.",
    )
    max_concurrency = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Most requests each worker runs for the tenant at once; more wait in its "
        "queue (429 with Retry-After once that is full). Empty: unlimited.",
    )
    tokens_per_s = models.FloatField(
        null=True,
        blank=True,
        validators=[validate_positive_finite, MaxValueValidator(1e9)],
        help_text="Output tokens per second each worker gives the tenant (a token bucket). "
        "Empty: unlimited.",
    )
    burst_tokens = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Size of the token bucket; empty means one second's worth of tokens_per_s.",
    )
    storage_iops = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Read+write IO/s of each of the tenant's volumes, unless its QoS policy is "
        "stricter; SPDK rounds up to a multiple of 1000. Empty: unlimited.",
    )
    storage_mb_s = models.PositiveBigIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="Read+write MiB/s of each of the tenant's volumes, unless its QoS policy "
        "is stricter. Empty: unlimited.",
    )

    class Meta:
        ordering = ["tenant__slug"]
        verbose_name_plural = "tenant policies"

    def __str__(self) -> str:
        return f"policy of {self.tenant}"

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every setting at its default: what a tenant without a policy gets."""
        return {name: cls._meta.get_field(name).get_default() for name in POLICY_FIELDS}

    def clean(self) -> None:
        if self.burst_tokens is not None and self.tokens_per_s is None:
            raise ValidationError(
                {"burst_tokens": ["The burst sizes the tokens_per_s bucket; set tokens_per_s too."]}
            )

    def serving(self, key_hashes: list[str]) -> TenantServing:
        """How an inference worker is told to serve the tenant."""
        return TenantServing(
            tenant_id=self.tenant_id,
            weight=self.weight,
            priority=WORKER_PRIORITY[PriorityClass(self.priority_class)],
            key_hashes=key_hashes,
            max_concurrency=self.max_concurrency,
            tokens_per_s=self.tokens_per_s,
            burst_tokens=self.burst_tokens,
        )


POLICY_FIELDS = (
    "weight",
    "priority_class",
    "max_concurrency",
    "tokens_per_s",
    "burst_tokens",
    "storage_iops",
    "storage_mb_s",
)

"""Abstract base models every domain app builds on."""

from __future__ import annotations

import uuid

from django.db import models


class BaseModel(models.Model):
    """UUID keys (ids reveal nothing about other tenants) and audit timestamps."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        abstract = True


class TenantOwnedModel(BaseModel):
    """An object that belongs to exactly one tenant; scoping filters on `tenant`."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.PROTECT, related_name="+")

    class Meta:
        abstract = True


class HashedSecret(BaseModel):
    """A secret shown once at creation; only its sha256 digest is stored.

    Secrets are 256-bit random strings, so a fast hash is enough and lets the
    inference worker match keys with the same digest.
    """

    name = models.CharField(max_length=100)
    prefix = models.CharField(
        max_length=16, editable=False, help_text="First characters, to tell keys apart."
    )
    digest = models.CharField(max_length=64, unique=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

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

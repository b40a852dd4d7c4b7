"""Serializer fields by which every app's API names a tenant."""

from __future__ import annotations

from django.db.models import QuerySet
from rest_framework import serializers

from controlplane.core.scoping import writable_tenant_ids
from controlplane.tenancy.models import Tenant


class WritableTenantField(serializers.PrimaryKeyRelatedField):
    """A tenant reference limited to tenants the caller administers.

    Another tenant's id then fails exactly like an unknown id: 400, no leak.
    """

    def get_queryset(self) -> QuerySet[Tenant]:
        request = self.context.get("request")
        queryset = Tenant.objects.filter(is_active=True)
        tenant_ids = writable_tenant_ids(request.user if request else None)
        return queryset if tenant_ids is None else queryset.filter(id__in=tenant_ids)

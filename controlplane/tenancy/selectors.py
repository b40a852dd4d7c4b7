"""Read-side queries for tenancy: tenants' data-plane policies, defaults filled in."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from uuid import UUID

from controlplane.tenancy.models import Tenant, TenantPolicy


def default_policy(tenant_id: UUID) -> TenantPolicy:
    """What a tenant without a policy gets; unsaved, so it has no id."""
    return TenantPolicy(id=None, tenant_id=tenant_id)


def policy_of(tenant: Tenant) -> TenantPolicy:
    """The tenant's policy, or the defaults (unsaved) where it has none."""
    return TenantPolicy.objects.filter(tenant=tenant).first() or default_policy(tenant.pk)


def policies_for(tenant_ids: Iterable[Any]) -> dict[UUID, TenantPolicy]:
    """Each tenant's policy, defaults filled in, in one query."""
    wanted = set(tenant_ids)
    stored = {p.tenant_id: p for p in TenantPolicy.objects.filter(tenant_id__in=wanted)}
    return {tenant_id: stored.get(tenant_id) or default_policy(tenant_id) for tenant_id in wanted}

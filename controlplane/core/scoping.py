"""Who may see and change which tenant's objects.

One place answers "which tenants can this user read / write", so every selector,
serializer and permission agrees. Platform admins (superusers) see everything.
"""

from __future__ import annotations

from typing import Any

from django.db.models import Model, Q, QuerySet

from controlplane.core.choices import Role


def is_platform_admin(user: Any) -> bool:
    return bool(user and user.is_authenticated and user.is_active and user.is_superuser)


def readable_tenant_ids(user: Any) -> set[Any] | None:
    """Tenant ids the user may read; None means all (platform admin)."""
    if is_platform_admin(user):
        return None
    if not (user and user.is_authenticated):
        return set()
    return set(user.memberships.values_list("tenant_id", flat=True))


def writable_tenant_ids(user: Any) -> set[Any] | None:
    """Tenant ids the user administers; None means all (platform admin)."""
    if is_platform_admin(user):
        return None
    if not (user and user.is_authenticated):
        return set()
    return set(user.memberships.filter(role=Role.ADMIN).values_list("tenant_id", flat=True))


def scope(queryset: QuerySet[Any], user: Any, field: str = "tenant") -> QuerySet[Any]:
    """Restrict a queryset to the user's tenants through `field` (a tenant FK path)."""
    tenant_ids = readable_tenant_ids(user)
    if tenant_ids is None:
        return queryset
    return queryset.filter(Q(**{f"{field}__in": tenant_ids}))


def tenant_of(obj: Model, field: str = "tenant") -> Any:
    """The tenant id an object belongs to, following a `__` path of foreign keys.

    `field="id"` names the tenant itself.
    """
    *hops, last = field.split("__")
    for hop in hops:
        obj = getattr(obj, hop)
        if obj is None:
            return None
    return getattr(obj, f"{last}_id") if hasattr(obj, f"{last}_id") else getattr(obj, last)


def can_write(user: Any, obj: Model, field: str = "tenant") -> bool:
    tenant_ids = writable_tenant_ids(user)
    return tenant_ids is None or tenant_of(obj, field) in tenant_ids

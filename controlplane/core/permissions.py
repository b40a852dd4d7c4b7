"""Role-based permission shared by every API view.

Reads need a membership in the object's tenant (enforced by queryset scoping, so
other tenants' objects are 404, not 403); writes need the tenant admin role.
Objects with no tenant (shared fleet nodes) are the platform admins' alone.
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import SAFE_METHODS, BasePermission

from controlplane.core.scoping import can_write, is_platform_admin


class TenantRolePermission(BasePermission):
    message = "Changing this object needs the tenant admin role."

    def has_permission(self, request: Any, view: Any) -> bool:
        return bool(request.user and request.user.is_authenticated)

    def has_object_permission(self, request: Any, view: Any, obj: Any) -> bool:
        if request.method in SAFE_METHODS:
            return True
        return can_write(request.user, obj, getattr(view, "tenant_field", "tenant"))


class IsPlatformAdmin(BasePermission):
    message = "Only platform admins may do this."

    def has_permission(self, request: Any, view: Any) -> bool:
        return is_platform_admin(request.user)

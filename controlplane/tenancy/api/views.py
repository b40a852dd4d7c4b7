"""Thin viewsets over tenancy services and selectors."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import status, viewsets
from rest_framework.generics import GenericAPIView
from rest_framework.permissions import SAFE_METHODS, BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer
from rest_framework.views import APIView

from controlplane.core.api import SecretViewSet, TenantScopedMixin, TenantScopedViewSet
from controlplane.core.permissions import IsPlatformAdmin, TenantRolePermission
from controlplane.core.scoping import is_platform_admin
from controlplane.core.secrets import Issued
from controlplane.tenancy import selectors, services
from controlplane.tenancy.api import serializers as s
from controlplane.tenancy.filtersets import (
    InferenceKeyFilterSet,
    MembershipFilterSet,
    TenantFilterSet,
    TenantPolicyFilterSet,
)
from controlplane.tenancy.models import ApiToken, InferenceKey, Membership, Tenant, TenantPolicy


class TenantViewSet(TenantScopedViewSet):
    """Tenants the caller belongs to. Creating and deleting tenants is for platform admins."""

    queryset = Tenant.objects.all()
    serializer_class = s.TenantSerializer
    filterset_class = TenantFilterSet
    search_fields = ["slug", "name"]
    ordering_fields = ["slug", "name", "created_at"]
    tenant_field = "id"

    def get_permissions(self) -> list[Any]:
        if self.action in ("create", "destroy"):
            return [IsPlatformAdmin()]
        return [TenantRolePermission()]


class PlatformAdminWrites(BasePermission):
    message = "Only platform admins change tenant policies; tenant members may read them."

    def has_permission(self, request: Any, view: Any) -> bool:
        return bool(request.user and request.user.is_authenticated)

    def has_object_permission(self, request: Any, view: Any, obj: Any) -> bool:
        return request.method in SAFE_METHODS or is_platform_admin(request.user)


class TenantPolicyView(TenantScopedMixin, GenericAPIView):
    """A tenant's data-plane policy: its share and class on inference workers and the
    limits workers and storage engines enforce. Members read their tenant's; platform
    admins change it. PUT sets every field (those left out go back to their defaults),
    PATCH the fields given; DELETE removes the policy, so the tenant runs on the
    defaults. Every change reaches the nodes that serve the tenant or hold its volumes."""

    queryset = Tenant.objects.all()
    tenant_field = "id"
    serializer_class = s.TenantPolicySerializer
    permission_classes = [PlatformAdminWrites]
    filter_backends: list[Any] = []
    pagination_class = None

    def _policy(self, tenant: Tenant) -> Response:
        return Response(self.get_serializer(selectors.policy_of(tenant)).data)

    def _write(self, *, partial: bool) -> Response:
        tenant = self.get_object()
        serializer = self.get_serializer(
            selectors.policy_of(tenant), data=self.request.data, partial=partial
        )
        serializer.is_valid(raise_exception=True)
        fields = dict(serializer.validated_data)
        services.set_tenant_policy(
            tenant, **(fields if partial else {**TenantPolicy.defaults(), **fields})
        )
        return self._policy(tenant)

    def get(self, request: Request, pk: str) -> Response:
        return self._policy(self.get_object())

    def put(self, request: Request, pk: str) -> Response:
        return self._write(partial=False)

    def patch(self, request: Request, pk: str) -> Response:
        return self._write(partial=True)

    @extend_schema(responses={204: None})
    def delete(self, request: Request, pk: str) -> Response:
        services.remove_tenant_policy(self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)


class TenantPolicyViewSet(TenantScopedMixin, viewsets.ReadOnlyModelViewSet):
    """Stored tenant policies; a tenant without one runs on the defaults. Change one at
    /tenants/{id}/policy/."""

    queryset = TenantPolicy.objects.select_related("tenant")
    serializer_class = s.TenantPolicySerializer
    filterset_class = TenantPolicyFilterSet
    ordering_fields = ["updated_at", "weight", "priority_class"]


class MembershipViewSet(TenantScopedViewSet):
    queryset = Membership.objects.select_related("tenant", "user")
    serializer_class = s.MembershipSerializer
    filterset_class = MembershipFilterSet
    ordering_fields = ["created_at", "role"]

    def perform_create(self, serializer: Serializer) -> None:
        serializer.instance = services.set_membership(**serializer.validated_data)


@extend_schema_view(create=extend_schema(responses={201: s.ApiTokenCreatedSerializer}))
class ApiTokenViewSet(SecretViewSet):
    """The caller's own API tokens."""

    queryset = ApiToken.objects.all()
    serializer_class = s.ApiTokenSerializer
    created_serializer_class = s.ApiTokenCreatedSerializer
    secret_field = "token"
    permission_classes = [IsAuthenticated]
    ordering_fields = ["created_at", "name"]

    def get_queryset(self) -> QuerySet[ApiToken]:
        return super().get_queryset().filter(user_id=self.request.user.pk)

    def issue(self, validated: dict[str, Any]) -> Issued:
        return services.issue_api_token(user=self.request.user, **validated)

    def revoke(self, instance: ApiToken) -> None:
        services.revoke(instance)


@extend_schema_view(create=extend_schema(responses={201: s.InferenceKeyCreatedSerializer}))
class InferenceKeyViewSet(TenantScopedMixin, SecretViewSet):
    """Keys that name a tenant to inference workers."""

    queryset = InferenceKey.objects.all()
    serializer_class = s.InferenceKeySerializer
    created_serializer_class = s.InferenceKeyCreatedSerializer
    secret_field = "key"
    filterset_class = InferenceKeyFilterSet
    ordering_fields = ["created_at", "name"]

    def issue(self, validated: dict[str, Any]) -> Issued:
        return services.issue_inference_key(created_by=self.request.user, **validated)

    def revoke(self, instance: InferenceKey) -> None:
        services.revoke(instance)


class MeView(APIView):
    """Who the caller is and what they may do."""

    permission_classes = [IsAuthenticated]

    @extend_schema(responses=s.MeSerializer)
    def get(self, request: Request) -> Response:
        user = request.user
        body = {
            "username": user.get_username(),
            "is_platform_admin": is_platform_admin(user),
            "memberships": user.memberships.select_related("tenant"),
        }
        return Response(s.MeSerializer(body).data)

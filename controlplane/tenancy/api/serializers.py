"""Serializers for tenants, memberships, API tokens and inference keys."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.db import transaction
from rest_framework import serializers
from rest_framework.exceptions import PermissionDenied

from controlplane.core.api import PositiveFloatField, SecretSerializer, StrictSerializer
from controlplane.core.scoping import is_platform_admin
from controlplane.tenancy.api.fields import WritableTenantField
from controlplane.tenancy.models import (
    POLICY_FIELDS,
    QUOTA_FIELDS,
    ApiToken,
    InferenceKey,
    Membership,
    Tenant,
    TenantPolicy,
    validate_positive_finite,
)
from controlplane.tenancy.services import create_tenant, set_tenant_active, set_tenant_quota


class TenantSerializer(StrictSerializer):
    """Quotas and suspension (`is_active`) are read by the tenant's members and set by
    platform admins alone."""

    class Meta:
        model = Tenant
        fields = [
            "id",
            "slug",
            "name",
            "description",
            "is_active",
            *QUOTA_FIELDS,
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "created_at", "updated_at"]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        request = self.context.get("request")
        admin = is_platform_admin(request.user if request else None)
        if self.instance is not None and "is_active" in attrs and not admin:
            if attrs["is_active"] != self.instance.is_active:
                raise PermissionDenied("Only platform admins suspend or resume tenants.")
        if not admin and any(name in attrs for name in QUOTA_FIELDS):
            raise PermissionDenied("Only platform admins change tenant quotas.")
        return attrs

    def create(self, validated_data: dict[str, Any]) -> Tenant:
        quota = {name: validated_data.pop(name) for name in QUOTA_FIELDS if name in validated_data}
        with transaction.atomic():
            tenant = create_tenant(**validated_data)
            if quota:
                set_tenant_quota(tenant, **quota)
        return tenant

    def update(self, instance: Tenant, validated_data: dict[str, Any]) -> Tenant:
        """Quota changes re-plan placement and suspension reaches the workers, so both go
        through their services."""
        quota = {name: validated_data.pop(name) for name in QUOTA_FIELDS if name in validated_data}
        active = validated_data.pop("is_active", None)
        with transaction.atomic():
            instance = super().update(instance, validated_data)
            if active is not None:
                set_tenant_active(instance, active)
            if quota:
                set_tenant_quota(instance, **quota)
        return instance


class TenantPolicySerializer(StrictSerializer):
    """A tenant's data-plane policy; `is_default` marks a tenant that has none (no `id`)."""

    id = serializers.UUIDField(read_only=True, allow_null=True)
    tenant = serializers.PrimaryKeyRelatedField(read_only=True)
    is_default = serializers.SerializerMethodField()
    updated_at = serializers.DateTimeField(read_only=True, allow_null=True)

    class Meta:
        model = TenantPolicy
        fields = ["id", "tenant", *POLICY_FIELDS, "is_default", "updated_at"]

    def build_standard_field(
        self, field_name: str, model_field: Any
    ) -> tuple[type, dict[str, Any]]:
        field_class, kwargs = super().build_standard_field(field_name, model_field)
        if validate_positive_finite in model_field.validators:
            field_class = PositiveFloatField
        return field_class, kwargs

    def get_is_default(self, obj: TenantPolicy) -> bool:
        return obj.pk is None


class MembershipSerializer(StrictSerializer):
    tenant = WritableTenantField()
    user = serializers.SlugRelatedField(
        slug_field="username", queryset=get_user_model().objects.filter(is_active=True)
    )

    class Meta:
        model = Membership
        fields = ["id", "tenant", "user", "role", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]


class ApiTokenSerializer(SecretSerializer):
    class Meta:
        model = ApiToken
        fields = ["id", "name", "prefix", "expires_at", "last_used_at", "revoked", "created_at"]
        read_only_fields = ["id", "prefix", "last_used_at", "created_at"]


class ApiTokenCreatedSerializer(ApiTokenSerializer):
    token = serializers.CharField(read_only=True, help_text="Shown once; store it now.")

    class Meta(ApiTokenSerializer.Meta):
        fields = [*ApiTokenSerializer.Meta.fields, "token"]


class InferenceKeySerializer(SecretSerializer):
    tenant = WritableTenantField()

    class Meta:
        model = InferenceKey
        fields = ["id", "tenant", "name", "prefix", "last_used_at", "revoked", "created_at"]
        read_only_fields = ["id", "prefix", "last_used_at", "created_at"]


class InferenceKeyCreatedSerializer(InferenceKeySerializer):
    key = serializers.CharField(read_only=True, help_text="Shown once; store it now.")

    class Meta(InferenceKeySerializer.Meta):
        fields = [*InferenceKeySerializer.Meta.fields, "key"]


class MembershipSummarySerializer(serializers.Serializer):
    tenant = serializers.UUIDField(source="tenant_id")
    tenant_slug = serializers.CharField(source="tenant.slug")
    role = serializers.CharField()


class MeSerializer(serializers.Serializer):
    username = serializers.CharField()
    is_platform_admin = serializers.BooleanField()
    memberships = MembershipSummarySerializer(many=True)

"""Serializers for tenants, memberships, API tokens and inference keys."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from rest_framework import serializers

from controlplane.core.api import SecretSerializer, StrictSerializer, WritableTenantField
from controlplane.tenancy.models import ApiToken, InferenceKey, Membership, Tenant


class TenantSerializer(StrictSerializer):
    class Meta:
        model = Tenant
        fields = ["id", "slug", "name", "description", "is_active", "created_at", "updated_at"]
        read_only_fields = ["id", "created_at", "updated_at"]


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

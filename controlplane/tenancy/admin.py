from django.contrib import admin

from controlplane.tenancy import services
from controlplane.tenancy.models import (
    POLICY_FIELDS,
    QUOTA_FIELDS,
    ApiToken,
    InferenceKey,
    Membership,
    Tenant,
    TenantPolicy,
)


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "is_active", "created_at"]
    list_filter = ["is_active"]
    search_fields = ["slug", "name"]
    inlines = [MembershipInline]

    def save_model(self, request, obj, form, change):  # noqa: ANN001, ANN201
        """Suspension reaches the workers and quotas re-plan placement, so those changes
        go through their services rather than a plain save."""
        wanted = {
            name: getattr(obj, name)
            for name in ("is_active", *QUOTA_FIELDS)
            if change and name in form.changed_data
        }
        for name in wanted:
            setattr(obj, name, form.initial[name])
        super().save_model(request, obj, form, change)
        if "is_active" in wanted:
            services.set_tenant_active(obj, wanted.pop("is_active"))
        if wanted:
            services.set_tenant_quota(obj, **wanted)


@admin.register(TenantPolicy)
class TenantPolicyAdmin(admin.ModelAdmin):
    """Saved through the service, so the nodes serving the tenant get the change."""

    list_display = ["tenant", *POLICY_FIELDS, "updated_at"]
    list_filter = ["priority_class"]
    search_fields = ["tenant__slug"]
    autocomplete_fields = ["tenant"]
    fields = ["tenant", *POLICY_FIELDS]

    def get_readonly_fields(self, request, obj=None):  # noqa: ANN001, ANN201
        return ["tenant"] if obj else []

    def save_model(self, request, obj, form, change):  # noqa: ANN001, ANN201
        saved = services.set_tenant_policy(
            obj.tenant, **{name: getattr(obj, name) for name in POLICY_FIELDS}
        )
        obj.pk, obj.created_at, obj.updated_at = saved.pk, saved.created_at, saved.updated_at

    def delete_model(self, request, obj):  # noqa: ANN001, ANN201
        services.remove_tenant_policy(obj.tenant)

    def delete_queryset(self, request, queryset):  # noqa: ANN001, ANN201
        for policy in queryset.select_related("tenant"):
            services.remove_tenant_policy(policy.tenant)


@admin.register(Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ["user", "tenant", "role"]
    list_filter = ["role", "tenant"]
    search_fields = ["user__username", "tenant__slug"]
    autocomplete_fields = ["user", "tenant"]


class SecretAdmin(admin.ModelAdmin):
    """Secrets are issued through the API or the service layer, where the plaintext is shown once."""

    list_filter = ["revoked_at"]
    readonly_fields = ["prefix", "last_used_at", "created_at"]
    exclude = ["digest"]

    def has_add_permission(self, request):  # noqa: ANN001, ANN201
        return False


@admin.register(ApiToken)
class ApiTokenAdmin(SecretAdmin):
    list_display = ["name", "user", "prefix", "expires_at", "last_used_at", "revoked_at"]
    search_fields = ["name", "prefix", "user__username"]


@admin.register(InferenceKey)
class InferenceKeyAdmin(SecretAdmin):
    list_display = ["name", "tenant", "prefix", "last_used_at", "revoked_at"]
    list_filter = ["tenant", "revoked_at"]
    search_fields = ["name", "prefix", "tenant__slug"]

from django.contrib import admin

from controlplane.tenancy.models import ApiToken, InferenceKey, Membership, Tenant


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

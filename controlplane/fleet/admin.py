from django.contrib import admin

from controlplane.fleet.models import Deployment, Replica, Revision


class ReplicaInline(admin.TabularInline):
    model = Replica
    extra = 0
    can_delete = False
    readonly_fields = ["index", "node", "gpu_indices", "port", "reason"]

    def has_add_permission(self, request, obj=None):  # noqa: ANN001, ANN201
        return False


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    """Edits here go through the same placement and rollout as the API."""

    list_display = ["name", "tenant", "model_name", "replicas", "gpus_per_replica", "gpu_model"]
    list_filter = ["tenant", "gpu_model"]
    search_fields = ["name", "model_name"]
    inlines = [ReplicaInline]

    def save_model(self, request, obj, form, change):  # noqa: ANN001, ANN201
        from controlplane.fleet import services

        fields = {name: form.cleaned_data[name] for name in form.changed_data}
        if change:
            services.update_deployment(obj, **fields)
        else:
            created = services.create_deployment(
                **{
                    f.attname: getattr(obj, f.attname)
                    for f in obj._meta.concrete_fields
                    if f.name not in ("id", "created_at", "updated_at")
                }
            )
            obj.pk, obj.created_at, obj.updated_at = (
                created.pk,
                created.created_at,
                created.updated_at,
            )

    def delete_model(self, request, obj):  # noqa: ANN001, ANN201
        from controlplane.fleet import services

        services.delete_deployment(obj)


@admin.register(Revision)
class RevisionAdmin(admin.ModelAdmin):
    list_display = [
        "node",
        "generation",
        "status",
        "cause",
        "rejection_reason",
        "created_at",
        "reported_at",
    ]
    list_filter = ["status", "rejection_reason"]
    search_fields = ["node__hostname", "content_hash", "cause"]
    readonly_fields = [
        "node",
        "generation",
        "content_hash",
        "document",
        "cause",
        "status",
        "results",
        "rejection_reason",
        "reported_at",
        "created_at",
    ]

    def has_add_permission(self, request):  # noqa: ANN001, ANN201
        return False

    def has_change_permission(self, request, obj=None):  # noqa: ANN001, ANN201
        return False

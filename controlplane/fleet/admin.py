import json
from typing import Any

from django.contrib import admin
from django.utils.html import format_html

from controlplane.fleet.models import Deployment, Replica, Revision
from controlplane.fleet.selectors import nodes_with_rollout
from controlplane.fleet.services import delete_node, rollout_state
from controlplane.inventory.admin import DriveInline, GpuInline, NicInline, NumaInline
from controlplane.inventory.models import Node
from controlplane.inventory.services import OPERATOR_FIELDS, update_node


@admin.display(description="Explanation")
def explanation(replica: Replica) -> str:
    """The placement explanation, indented, for reading rather than editing."""
    return format_html("<pre>{}</pre>", json.dumps(replica.explanation, indent=2))


class ReplicaInline(admin.TabularInline):
    model = Replica
    extra = 0
    can_delete = False
    show_change_link = True  # the replica's page shows the full explanation
    fields = ["index", "node", "gpu_indices", "port", "reason"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):  # noqa: ANN001, ANN201
        return False


@admin.register(Replica)
class ReplicaAdmin(admin.ModelAdmin):
    """Where each replica runs and why, or why not; placement alone writes these."""

    list_display = ["__str__", "node", "gpu_indices", "port", "reason"]
    list_select_related = ["deployment", "node"]
    list_filter = [("node", admin.EmptyFieldListFilter), "deployment__tenant", "node"]
    search_fields = ["deployment__name", "node__hostname", "reason"]
    fields = ["deployment", "index", "node", "gpu_indices", "port", "pool", "reason", explanation]
    readonly_fields = fields

    def has_add_permission(self, request):  # noqa: ANN001, ANN201
        return False

    def has_change_permission(self, request, obj=None):  # noqa: ANN001, ANN201
        return False

    def has_delete_permission(self, request, obj=None):  # noqa: ANN001, ANN201
        return False


@admin.register(Deployment)
class DeploymentAdmin(admin.ModelAdmin):
    """Edits here go through the same placement and rollout as the API."""

    list_display = [
        "name",
        "tenant",
        "model_name",
        "replicas",
        "gpus_per_replica",
        "gpu_model",
        "placement_strategy",
    ]
    list_filter = ["tenant", "gpu_model", "placement_strategy"]
    search_fields = ["name", "model_name"]
    filter_horizontal = ["shared_with"]
    inlines = [ReplicaInline]

    def save_model(self, request, obj, form, change):  # noqa: ANN001, ANN201
        from controlplane.fleet import services

        fields = {
            name: form.cleaned_data[name] for name in form.changed_data if name != "shared_with"
        }
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

    def save_related(self, request, form, formsets, change):  # noqa: ANN001, ANN201
        """Sharing goes through the service as well, so the workers hear of it."""
        from controlplane.fleet import services

        services.share_deployment(form.instance, form.cleaned_data.get("shared_with", []))

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


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    """Registered by the fleet, which builds on inventory, because it lists each node's rollout."""

    list_display = [
        "hostname",
        "status",
        "maintenance",
        "tenant",
        "rollout",
        "agent_version",
        "last_heard",
        "cpu_count",
    ]
    list_filter = ["status", "maintenance", "tenant", "agent_version"]
    search_fields = ["hostname", "labels"]
    readonly_fields = [
        "status",
        "agent_version",
        "last_heard",
        "applied",
        "pinned",
        "last_rejection_reason",
        "last_rejection_detail",
        "last_rejection_at",
        "kernel",
        "os",
        "cpu_model",
        "cpu_count",
        "memory_total_bytes",
        "created_at",
        "updated_at",
    ]
    fields = [
        "hostname",
        "tenant",
        "labels",
        "maintenance",
        "maintenance_reason",
        "gateway",
        *readonly_fields,
    ]
    inlines = [NumaInline, GpuInline, NicInline, DriveInline]

    def save_model(self, request, obj, form, change):  # noqa: ANN001, ANN201
        """A drain, a dedication or the gateway re-plan and re-render the node, so operator
        edits go through the service rather than a plain save."""
        if not change:
            return super().save_model(request, obj, form, change)
        changes = {
            name: getattr(obj, name) for name in form.changed_data if name in OPERATOR_FIELDS
        }
        return update_node(Node.objects.get(pk=obj.pk), **changes)

    def delete_model(self, request, obj):  # noqa: ANN001, ANN201
        """Decommissioning places the node's replicas anew, as through the API."""
        delete_node(obj)

    def delete_queryset(self, request, queryset):  # noqa: ANN001, ANN201
        for node in queryset:
            delete_node(node)

    def get_readonly_fields(self, request, obj=None):  # noqa: ANN001, ANN201
        return [*self.readonly_fields, "hostname"] if obj else self.readonly_fields

    def get_queryset(self, request):  # noqa: ANN001, ANN201
        return nodes_with_rollout()

    @admin.display(description="Last heartbeat", ordering="last_heartbeat_at")
    def last_heard(self, node: Node) -> Any:
        return node.last_heartbeat_at  # annotated from the agent's report

    @admin.display(description="Applied generation")
    def applied(self, node: Node) -> int:
        return int(node.applied_generation)

    @admin.display(description="Rollout")
    def rollout(self, node: Node) -> str:
        """Desired vs applied generation, and the state operators act on."""
        state = rollout_state(node.desired_generation, node.applied_generation, node.head_status)
        pinned = ", pinned" if node.pinned else ""
        return f"{state} ({node.applied_generation}/{node.desired_generation or 0}{pinned})"

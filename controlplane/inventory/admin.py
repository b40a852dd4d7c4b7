from django.contrib import admin

from controlplane.fleet.services import rollout_state
from controlplane.inventory.models import BootstrapToken, Drive, Gpu, Nic, Node, NumaNode
from controlplane.inventory.selectors import nodes_with_hardware


class ReadOnlyInline(admin.TabularInline):
    """Discovered facts: shown, never edited by hand (the next report would undo it)."""

    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):  # noqa: ANN001, ANN201
        return False

    def get_readonly_fields(self, request, obj=None):  # noqa: ANN001, ANN201
        return [field.name for field in self.model._meta.fields]


class NumaInline(ReadOnlyInline):
    model = NumaNode


class GpuInline(ReadOnlyInline):
    model = Gpu


class NicInline(ReadOnlyInline):
    model = Nic


class DriveInline(ReadOnlyInline):
    model = Drive


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = [
        "hostname",
        "status",
        "maintenance",
        "tenant",
        "rollout",
        "agent_version",
        "last_heartbeat_at",
        "cpu_count",
    ]
    list_filter = ["status", "maintenance", "tenant", "agent_version"]
    search_fields = ["hostname", "labels"]
    readonly_fields = [
        "status",
        "agent_version",
        "last_heartbeat_at",
        "applied_generation",
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
    fields = ["hostname", "tenant", "labels", "maintenance", "maintenance_reason", *readonly_fields]
    inlines = [NumaInline, GpuInline, NicInline, DriveInline]

    def get_readonly_fields(self, request, obj=None):  # noqa: ANN001, ANN201
        return [*self.readonly_fields, "hostname"] if obj else self.readonly_fields

    def get_queryset(self, request):  # noqa: ANN001, ANN201
        return nodes_with_hardware()

    @admin.display(description="Rollout")
    def rollout(self, node: Node) -> str:
        """Desired vs applied generation, and the state operators act on."""
        state = rollout_state(node.desired_generation, node.applied_generation, node.head_status)
        pinned = ", pinned" if node.pinned else ""
        return f"{state} ({node.applied_generation}/{node.desired_generation or 0}{pinned})"


class HardwareAdmin(admin.ModelAdmin):
    list_select_related = ["node"]

    def has_add_permission(self, request):  # noqa: ANN001, ANN201
        return False

    def has_change_permission(self, request, obj=None):  # noqa: ANN001, ANN201
        return False


@admin.register(Gpu)
class GpuAdmin(HardwareAdmin):
    list_display = [
        "node",
        "index",
        "name",
        "memory_total_bytes",
        "mig_mode",
        "pci_bus_id",
        "pci_root",
        "numa_node",
    ]
    list_filter = ["name", "mig_mode", "numa_node"]
    search_fields = ["uuid", "node__hostname", "pci_bus_id"]


@admin.register(Nic)
class NicAdmin(HardwareAdmin):
    list_display = [
        "node",
        "device",
        "port",
        "state",
        "speed_gbps",
        "link_layer",
        "pci_root",
        "numa_node",
    ]
    list_filter = ["state", "link_layer", "numa_node"]
    search_fields = ["device", "netdev", "node__hostname"]


@admin.register(Drive)
class DriveAdmin(HardwareAdmin):
    list_display = ["node", "name", "model", "capacity_bytes", "pci_root", "numa_node"]
    list_filter = ["model", "numa_node"]
    search_fields = ["serial", "model", "node__hostname"]


@admin.register(BootstrapToken)
class BootstrapTokenAdmin(admin.ModelAdmin):
    """Tokens are issued through the API, where the plaintext is shown once."""

    list_display = [
        "name",
        "prefix",
        "tenant",
        "uses_left",
        "expires_at",
        "used_at",
        "node",
        "revoked_at",
    ]
    list_filter = ["tenant", "revoked_at"]
    readonly_fields = ["prefix", "uses_left", "used_at", "node", "created_by", "created_at"]
    exclude = ["digest"]

    def has_add_permission(self, request):  # noqa: ANN001, ANN201
        return False

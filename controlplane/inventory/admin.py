from django.contrib import admin

from controlplane.inventory.models import BootstrapToken, Drive, Gpu, Nic, NumaNode


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

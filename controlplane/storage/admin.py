from django.contrib import admin

from controlplane.storage.models import Artifact, Export, Pool, QosPolicy, Volume


class ViewOnlyAdmin(admin.ModelAdmin):
    """Shown here, changed through the API: its services place volumes and roll out to nodes."""

    def has_add_permission(self, request):  # noqa: ANN001, ANN201
        return False

    def has_change_permission(self, request, obj=None):  # noqa: ANN001, ANN201
        return False

    def has_delete_permission(self, request, obj=None):  # noqa: ANN001, ANN201
        return False


@admin.register(Pool)
class PoolAdmin(ViewOnlyAdmin):
    list_display = [
        "name",
        "node",
        "kind",
        "capacity_bytes",
        "reported_capacity_bytes",
        "reported_free_bytes",
        "reported_at",
    ]
    list_filter = ["kind"]
    list_select_related = ["node"]
    search_fields = ["name", "node__hostname"]


@admin.register(Volume)
class VolumeAdmin(ViewOnlyAdmin):
    list_display = ["name", "tenant", "size_bytes", "pool", "qos_policy"]
    list_filter = ["tenant"]
    list_select_related = ["tenant", "pool__node", "qos_policy"]
    search_fields = ["name"]


@admin.register(QosPolicy)
class QosPolicyAdmin(ViewOnlyAdmin):
    list_display = [
        "name",
        "tenant",
        "rw_ios_per_sec",
        "rw_mbytes_per_sec",
        "r_mbytes_per_sec",
        "w_mbytes_per_sec",
    ]
    list_filter = ["tenant"]


@admin.register(Export)
class ExportAdmin(ViewOnlyAdmin):
    list_display = ["tenant", "hosts", "updated_at"]


@admin.register(Artifact)
class ArtifactAdmin(ViewOnlyAdmin):
    list_display = ["name", "tenant", "size_bytes", "sha256", "created_at"]
    list_filter = ["tenant"]
    search_fields = ["name", "sha256"]

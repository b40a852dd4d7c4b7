from django.contrib import admin

from controlplane.slo.models import Slo, SloStatus
from controlplane.storage.admin import ViewOnlyAdmin


class SloStatusInline(admin.StackedInline):
    model = SloStatus
    can_delete = False
    readonly_fields = [
        "evaluated_at",
        "good",
        "total",
        "achieved_ratio",
        "budget_remaining_ratio",
        "burn_rates",
        "firing",
    ]


@admin.register(Slo)
class SloAdmin(ViewOnlyAdmin):
    list_display = ["name", "tenant", "sli", "threshold_seconds", "objective", "window", "scope"]
    list_filter = ["tenant", "sli", "window"]
    list_select_related = ["tenant"]
    search_fields = ["name", "display_name"]
    inlines = [SloStatusInline]

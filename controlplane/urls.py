from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from controlplane.telemetry.api.agent_views import TelemetryView
from controlplane.telemetry.metrics import metrics_view

api_v1 = [
    path("", include("controlplane.tenancy.api.urls")),
    path("", include("controlplane.inventory.api.urls")),
    path("", include("controlplane.storage.api.urls")),
    path("", include("controlplane.fleet.api.urls")),
    path("", include("controlplane.slo.api.urls")),
    path("", include("controlplane.alerts.api.urls")),
    path("telemetry/", include("controlplane.telemetry.api.urls")),
    path("console/", include("controlplane.console.api.urls")),
    path("agent/telemetry/", TelemetryView.as_view(), name="agent-telemetry"),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api-auth/", include("rest_framework.urls")),
    path("console/", include("controlplane.console.urls")),
    path("metrics", metrics_view, name="metrics"),
]

handler400 = "controlplane.core.views.bad_request"
handler403 = "controlplane.core.views.permission_denied"
handler404 = "controlplane.core.views.not_found"
handler500 = "controlplane.core.views.server_error"

admin.site.site_header = "Tailguard admin"
admin.site.site_title = "Tailguard"
admin.site.index_title = "Fleet, tenants and policies"

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

api_v1 = [
    path("", include("controlplane.tenancy.api.urls")),
    path("", include("controlplane.inventory.api.urls")),
    path("", include("controlplane.storage.api.urls")),
    path("", include("controlplane.fleet.api.urls")),
]

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api-auth/", include("rest_framework.urls")),
]

handler404 = "controlplane.core.views.not_found"

admin.site.site_header = "Tailguard admin"
admin.site.site_title = "Tailguard"
admin.site.index_title = "Fleet, tenants and policies"

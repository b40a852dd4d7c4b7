from django.urls import path

from controlplane.telemetry.api import views

urlpatterns = [
    path("fleet/", views.FleetView.as_view(), name="telemetry-fleet"),
    path("nodes/<uuid:pk>/", views.NodeView.as_view(), name="telemetry-node"),
    path("deployments/<uuid:pk>/", views.DeploymentView.as_view(), name="telemetry-deployment"),
    path("storage/", views.StorageView.as_view(), name="telemetry-storage"),
    path("tenants/<uuid:pk>/", views.TenantView.as_view(), name="telemetry-tenant"),
]

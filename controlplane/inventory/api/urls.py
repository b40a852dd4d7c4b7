from django.urls import path
from rest_framework.routers import SimpleRouter

from controlplane.inventory.api import agent_views, views

router = SimpleRouter()
router.register("gpus", views.GpuViewSet)
router.register("nics", views.NicViewSet)
router.register("drives", views.DriveViewSet)
router.register("bootstrap-tokens", views.BootstrapTokenViewSet)

urlpatterns = [
    path("agent/enroll/", agent_views.EnrollView.as_view(), name="agent-enroll"),
    path("agent/inventory/", agent_views.InventoryView.as_view(), name="agent-inventory"),
    path("agent/heartbeat/", agent_views.HeartbeatView.as_view(), name="agent-heartbeat"),
    *router.urls,
]

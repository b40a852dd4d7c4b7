from django.urls import path
from rest_framework.routers import SimpleRouter

from controlplane.storage.api import agent_views, views

router = SimpleRouter()
router.register("pools", views.PoolViewSet)
router.register("volumes", views.VolumeViewSet)
router.register("qos-policies", views.QosPolicyViewSet)
router.register("exports", views.ExportViewSet)
router.register("artifacts", views.ArtifactViewSet)

urlpatterns = [
    path(
        "agent/artifacts/<uuid:pk>/", agent_views.AgentArtifactView.as_view(), name="agent-artifact"
    ),
    path("agent/storage/", agent_views.StorageReportView.as_view(), name="agent-storage"),
    *router.urls,
]

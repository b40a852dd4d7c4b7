from django.urls import path
from rest_framework.routers import SimpleRouter

from controlplane.fleet.api import agent_views, views

router = SimpleRouter()
router.register("nodes", views.NodeViewSet)
router.register("deployments", views.DeploymentViewSet)
router.register("replicas", views.ReplicaViewSet)
router.register("revisions", views.RevisionViewSet)

urlpatterns = [
    path(
        "agent/desired-state/", agent_views.DesiredStateView.as_view(), name="agent-desired-state"
    ),
    path("agent/status/", agent_views.AppliedStatusView.as_view(), name="agent-status"),
    *router.urls,
]

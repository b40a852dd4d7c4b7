from django.urls import path

from controlplane.console.api import views

urlpatterns = [
    path("slos/", views.SloOverviewView.as_view(), name="console-slos"),
    path("slos/<uuid:pk>/", views.SloDetailView.as_view(), name="console-slo"),
    path("health/", views.FleetHealthView.as_view(), name="console-health"),
]

from django.urls import path
from rest_framework.routers import SimpleRouter

from controlplane.slo.api import views

router = SimpleRouter()
router.register("slos", views.SloViewSet)

urlpatterns = [
    path("slo-reports/", views.SloReportView.as_view(), name="slo-report"),
    *router.urls,
]

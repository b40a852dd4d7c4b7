"""Console pages of the SLO app (the API lives in api/urls.py)."""

from django.urls import path

from controlplane.slo import views

urlpatterns = [
    path(
        "console/tenants/<uuid:tenant_id>/slo-report/",
        views.SloReportPage.as_view(),
        name="slo-report-page",
    ),
]

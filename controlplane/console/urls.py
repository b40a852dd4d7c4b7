from django.contrib.auth import views as auth_views
from django.urls import path, reverse_lazy

from controlplane.console import views

app_name = "console"

urlpatterns = [
    path("", views.home, name="home"),
    path("fleet/", views.FleetPage.as_view(), name="fleet"),
    path("slos/", views.SloOverviewPage.as_view(), name="slos"),
    path("slos/<uuid:pk>/", views.SloDetailPage.as_view(), name="slo"),
    path(
        "login/",
        auth_views.LoginView.as_view(
            template_name="console/login.html",
            extra_context={"title": "Sign in"},
            redirect_authenticated_user=True,
            next_page=reverse_lazy("console:home"),
        ),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(next_page="console:login"), name="logout"),
    path("nodes/<uuid:pk>/", views.NodePage.as_view(), name="node"),
    path("deployments/<uuid:pk>/", views.DeploymentPage.as_view(), name="deployment"),
    path("storage/", views.StoragePage.as_view(), name="storage"),
    path("tenants/", views.TenantListPage.as_view(), name="tenants"),
    path("tenants/<uuid:pk>/", views.TenantPage.as_view(), name="tenant"),
    path(
        "tenants/<uuid:tenant_id>/slo-report/",
        views.SloReportPage.as_view(),
        name="slo-report-page",
    ),
]

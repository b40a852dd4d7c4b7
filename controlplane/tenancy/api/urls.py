from django.urls import path
from rest_framework.routers import SimpleRouter

from controlplane.tenancy.api import views

router = SimpleRouter()
router.register("tenants", views.TenantViewSet)
router.register("memberships", views.MembershipViewSet)
router.register("api-tokens", views.ApiTokenViewSet, basename="apitoken")
router.register("inference-keys", views.InferenceKeyViewSet)
router.register("tenant-policies", views.TenantPolicyViewSet)

urlpatterns = [
    path("me/", views.MeView.as_view(), name="me"),
    path("tenants/<uuid:pk>/policy/", views.TenantPolicyView.as_view(), name="tenant-policy"),
    *router.urls,
]

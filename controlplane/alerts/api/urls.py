from rest_framework.routers import SimpleRouter

from controlplane.alerts.api import views

router = SimpleRouter()
router.register("alerts", views.AlertViewSet)
router.register("webhook-endpoints", views.WebhookEndpointViewSet)
router.register("webhook-messages", views.OutboxMessageViewSet)
router.register("delivery-attempts", views.DeliveryAttemptViewSet)

urlpatterns = router.urls

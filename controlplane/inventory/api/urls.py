from rest_framework.routers import SimpleRouter

from controlplane.inventory.api import views

router = SimpleRouter()
router.register("nodes", views.NodeViewSet)
router.register("gpus", views.GpuViewSet)
router.register("nics", views.NicViewSet)
router.register("drives", views.DriveViewSet)

urlpatterns = router.urls

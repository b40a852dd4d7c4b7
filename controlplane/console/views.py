"""Console pages: each serves a shell that the frontend fills from the snapshot API and the
dashboard WebSocket; the server only decides whether the user may open it (else 404)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from django.contrib.auth.mixins import LoginRequiredMixin
from django.http import Http404
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.views.generic import TemplateView

from controlplane.core.scoping import is_platform_admin
from controlplane.telemetry import selectors, streams


class ConsolePage(LoginRequiredMixin, TemplateView):
    """Any console page: signed in, with the navigation the user's role calls for."""

    title: str

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context.update(
            {
                "title": self.title,
                "platform_admin": is_platform_admin(self.request.user),
                "tenants": selectors.visible_tenants(self.request.user),
            }
        )
        return context


class DashboardPage(ConsolePage, ABC):
    """A live dashboard: `page` picks the frontend module, `snapshot` and `streams` feed it."""

    template_name = "console/dashboard.html"
    page: str

    @abstractmethod
    def dashboard(self) -> dict[str, Any]:
        """The page's title, snapshot URL and fixed streams (the fleet and storage pages
        add node streams from their snapshot)."""

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        context.update({"page": self.page, "streams": []})
        context.update(self.dashboard())
        return context


class FleetPage(DashboardPage):
    page = "fleet"
    title = "Fleet"

    def dashboard(self) -> dict[str, Any]:
        admin = is_platform_admin(self.request.user)
        return {
            "snapshot": reverse("telemetry-fleet"),
            "streams": [streams.FLEET] if admin else [],
        }


class NodePage(DashboardPage):
    page = "node"
    title = "Node"

    def dashboard(self) -> dict[str, Any]:
        node = selectors.node_with_stream(self.request.user, self.kwargs["pk"])
        if node is None:
            raise Http404
        return {
            "title": node.hostname,
            "snapshot": reverse("telemetry-node", args=[node.pk]),
            "streams": [streams.node(node.pk)],
        }


class DeploymentPage(DashboardPage):
    page = "deployment"
    title = "Deployment"

    def dashboard(self) -> dict[str, Any]:
        deployment = get_object_or_404(
            selectors.visible_deployments(self.request.user), pk=self.kwargs["pk"]
        )
        return {
            "title": f"{deployment.tenant.slug} / {deployment.name}",
            "snapshot": reverse("telemetry-deployment", args=[deployment.pk]),
            "streams": [streams.deployment(deployment.pk)],
            "tenant": deployment.tenant,
        }


class StoragePage(DashboardPage):
    page = "storage"
    title = "Storage"

    def dashboard(self) -> dict[str, Any]:
        return {"snapshot": reverse("telemetry-storage")}


class TenantPage(DashboardPage):
    page = "tenant"
    title = "Tenant"

    def dashboard(self) -> dict[str, Any]:
        tenant = get_object_or_404(
            selectors.visible_tenants(self.request.user), pk=self.kwargs["pk"]
        )
        return {
            "title": tenant.name,
            "snapshot": reverse("telemetry-tenant", args=[tenant.pk]),
            "streams": [streams.tenant(tenant.pk)],
        }


class TenantListPage(ConsolePage):
    template_name = "console/tenants.html"
    title = "Tenants"

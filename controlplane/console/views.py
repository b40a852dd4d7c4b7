"""Console pages: each serves a shell that the frontend fills from the snapshot API and the
dashboard WebSocket; the server only decides whether the user may open it (else 404). The
SLO report page alone is rendered here."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any
from urllib.parse import urlencode

from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import mark_safe
from django.views.generic import TemplateView

from controlplane.console import selectors as console_selectors
from controlplane.core.scoping import is_platform_admin, scope
from controlplane.fleet import selectors as fleet_selectors
from controlplane.slo import reports
from controlplane.telemetry import selectors, streams
from controlplane.tenancy.models import Tenant


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
        context.update({"page": self.page, "streams": [], "thresholds": []})
        context.update(self.dashboard())
        return context


class FleetPage(DashboardPage):
    page = "fleet"
    title = "Fleet"

    def dashboard(self) -> dict[str, Any]:
        admin = is_platform_admin(self.request.user)
        return {
            "snapshot": reverse("telemetry-fleet"),
            "health": reverse("console-health"),
            "streams": [streams.FLEET] if admin else [],
        }


class SloOverviewPage(DashboardPage):
    """Every SLO the user may see, worst first; followed by reloading its snapshot."""

    page = "slos"
    title = "Service level objectives"

    def dashboard(self) -> dict[str, Any]:
        return {"snapshot": reverse("console-slos")}


def home(request: HttpRequest) -> HttpResponse:
    """Platform admins start at the fleet, tenant users at their SLOs."""
    page = FleetPage if is_platform_admin(request.user) else SloOverviewPage
    return page.as_view()(request)


class SloDetailPage(DashboardPage):
    page = "slo"
    title = "SLO"

    def dashboard(self) -> dict[str, Any]:
        slo = get_object_or_404(
            console_selectors.visible_slos(self.request.user), pk=self.kwargs["pk"]
        )
        return {
            "title": slo.display_name or slo.name,
            "snapshot": reverse("console-slo", args=[slo.pk]),
            "report": reverse("console:slo-report-page", args=[slo.tenant_id]),
            "tenant": slo.tenant,
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
            "thresholds": console_selectors.latency_thresholds(deployment),
            "tenant": deployment.tenant,
            "endpoint": fleet_selectors.client_url(deployment),
            "endpoints": fleet_selectors.endpoints(deployment),
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
            "slos": f"{reverse('console-slos')}?{urlencode({'tenant': tenant.pk})}",
            "report": reverse("console:slo-report-page", args=[tenant.pk]),
            "streams": [streams.tenant(tenant.pk)],
        }


class TenantListPage(ConsolePage):
    template_name = "console/tenants.html"
    title = "Tenants"


class SloReportPage(ConsolePage):
    """The same report as the API, as HTML with inline SVG burn charts, and links to its
    PDF and CSV."""

    template_name = "console/slo_report.html"
    title = "SLO report"

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        tenant = get_object_or_404(
            scope(Tenant.objects.all(), request.user, "id"), pk=kwargs["tenant_id"]
        )
        context = self.get_context_data(
            tenant=tenant,
            page="tenant",
            period_from=request.GET.get("from", ""),
            period_to=request.GET.get("to", ""),
        )
        now = timezone.now()
        try:
            start, end = reports.parse_period(request.GET.get("from"), request.GET.get("to"), now)
        except ValidationError as exc:
            context["errors"] = [f"{field}: {' '.join(m)}" for field, m in exc.message_dict.items()]
            return self.render_to_response(context, status=400)
        report = reports.build(tenant, start, end, now)
        query = {"tenant": str(tenant.pk), "from": report["from"], "to": report["to"]}
        context.update(
            {
                "report": report,
                "period_from": report["from"],
                "period_to": report["to"],
                "slos": [_display(slo) for slo in report["slos"]],
                "latency": [
                    {
                        **row,
                        **{q: reports.seconds_text(row[q]) for q in ("p50", "p90", "p99", "p999")},
                    }
                    for row in report["latency"]
                ],
                "pdf_url": f"{reverse('slo-report')}?{urlencode({**query, 'format': 'pdf'})}",
                "csv_url": f"{reverse('slo-report')}?{urlencode({**query, 'format': 'csv'})}",
            }
        )
        return self.render_to_response(context)


def _display(slo: dict[str, Any]) -> dict[str, Any]:
    return {
        **slo,
        "sli_text": reports.sli_text(slo),
        "objective_text": reports.ratio_text(slo["objective"]),
        "achieved_text": reports.ratio_text(slo["achieved_ratio"]),
        "consumed_text": f"{slo['budget_consumed_ratio']:.1%}",
        "chart": mark_safe(reports.burn_svg(slo)),  # noqa: S308 - numbers and escaped text only
    }

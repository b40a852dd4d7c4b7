"""The console's SLO report page: the same report as the API, as HTML with inline SVG
burn charts, and a link to its PDF."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from django.core.exceptions import ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils import timezone
from django.utils.safestring import mark_safe

from controlplane.console.views import ConsolePage
from controlplane.core.scoping import scope
from controlplane.slo import reports
from controlplane.tenancy.models import Tenant


class SloReportPage(ConsolePage):
    template_name = "slo/report.html"
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

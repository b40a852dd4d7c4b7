"""Per-tenant SLO reports for any period: built once as plain data, then rendered as JSON
(the API), HTML (the console, with an inline SVG burn chart), CSV and PDF.

For each SLO the period's exact good/total gives the achieved ratio and the share of the
period's error budget consumed; the burn chart shows the budget remaining in the SLO's
own window (rolling, or the calendar month) at evenly spaced moments of the period.
"""

from __future__ import annotations

import csv
import io
from datetime import UTC, datetime, time, timedelta
from typing import Any

from django.core.exceptions import ValidationError
from django.utils.dateparse import parse_date, parse_datetime
from django.utils.html import escape

from controlplane.slo import selectors
from controlplane.slo.sli import Counts, window_start
from controlplane.tenancy.models import Tenant

CHART_POINTS = 48
MAX_PERIOD = timedelta(days=400)  # as far back as hourly rollups are kept


def parse_period(
    raw_from: str | None, raw_to: str | None, now: datetime
) -> tuple[datetime, datetime]:
    """`from`/`to` as ISO dates or datetimes (UTC unless an offset is given); by default the
    calendar month so far. The end is capped at now."""

    def parse(name: str, raw: str | None, default: datetime) -> datetime:
        if not raw:
            return default
        value = parse_datetime(raw)
        if value is None and (day := parse_date(raw)) is not None:
            value = datetime.combine(day, time.min)
        if value is None:
            raise ValidationError({name: [f"Use an ISO 8601 date or datetime, not {raw!r}."]})
        return value if value.tzinfo else value.replace(tzinfo=UTC)

    try:
        end = min(parse("to", raw_to, now), now)
        start = parse("from", raw_from, window_start("calendar_month", now))
    except ValueError as exc:  # a well-formed but impossible date, e.g. 2026-02-30
        raise ValidationError({"detail": str(exc)}) from None
    if start >= end:
        raise ValidationError({"from": ["Must be before `to` (and before now)."]})
    if end - start > MAX_PERIOD:
        raise ValidationError({"from": [f"A report covers at most {MAX_PERIOD.days} days."]})
    return start, end


def build(tenant: Tenant, start: datetime, end: datetime, now: datetime) -> dict[str, Any]:
    """The report as JSON-ready data."""
    alerts = selectors.alerts_in_period(tenant.pk, start, end)
    step = (end - start) / (CHART_POINTS - 1)
    moments = [start + step * i for i in range(CHART_POINTS)]
    slos = []
    for slo in selectors.slos_of_tenant(tenant.pk):
        windows = {"period": (start, end)}
        windows.update({f"t{i}": (window_start(slo.window, t), t) for i, t in enumerate(moments)})
        counts = selectors.slo_counts(slo, windows, now)
        period: Counts = counts["period"]
        achieved = period.achieved()
        slos.append(
            {
                "id": str(slo.pk),
                "name": slo.name,
                "display_name": slo.display_name or slo.name,
                "sli": slo.sli,
                "threshold_seconds": slo.threshold_seconds,
                "objective": slo.objective,
                "window": slo.window,
                "scope": slo.scope,
                "deployment": slo.deployment.name if slo.deployment else None,
                "model_name": slo.model_name or None,
                "good": period.good,
                "total": period.total,
                "achieved_ratio": achieved,
                "met": None if achieved is None else achieved >= slo.objective,
                "budget_consumed_ratio": 1.0 - period.budget_remaining(slo.objective),
                "burn": [
                    {
                        "t": t.isoformat(),
                        "budget_remaining_ratio": counts[f"t{i}"].budget_remaining(slo.objective),
                    }
                    for i, t in enumerate(moments)
                ],
                "alerts": [_alert(a) for a in alerts if a.labels.get("slo") == slo.name],
            }
        )
    return {
        "tenant": {"id": str(tenant.pk), "slug": tenant.slug, "name": tenant.name},
        "from": start.isoformat(),
        "to": end.isoformat(),
        "generated_at": now.isoformat(),
        "slos": slos,
        "latency": selectors.latency_percentiles(tenant.pk, start, end, now),
        "alerts": [_alert(a) for a in alerts],
    }


def _alert(alert: Any) -> dict[str, Any]:
    return {
        "id": str(alert.pk),
        "alertname": alert.name,
        "slo": alert.labels.get("slo"),
        "severity": alert.severity,
        "state": alert.state,
        "labels": alert.labels,
        "summary": alert.annotations.get("summary", ""),
        "starts_at": alert.starts_at.isoformat(),
        "ends_at": alert.ends_at.isoformat() if alert.ends_at else None,
    }


# --- Renderings ---------------------------------------------------------------------------

CSV_COLUMNS = [
    "record",
    "slo",
    "sli",
    "threshold_seconds",
    "objective",
    "good",
    "total",
    "achieved_ratio",
    "budget_consumed_ratio",
    "alerts",
    "deployment",
    "metric",
    "count",
    "p50",
    "p90",
    "p99",
    "p999",
]


def to_csv(report: dict[str, Any]) -> str:
    """One table: `record` slo rows (objective vs achieved), then latency rows per deployment."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for slo in report["slos"]:
        writer.writerow({**slo, "record": "slo", "slo": slo["name"], "alerts": len(slo["alerts"])})
    for row in report["latency"]:
        writer.writerow({**row, "record": "latency", "deployment": row["deployment_name"]})
    return out.getvalue()


def chart_points(
    burn: list[dict[str, Any]], width: float, height: float
) -> tuple[list[tuple[float, float]], float]:
    """Burn points scaled into a width x height box (y up from the bottom edge) and the
    height of the zero line: the y axis spans min(0, lowest) .. 100%."""
    values = [p["budget_remaining_ratio"] for p in burn]
    low = min(0.0, *values)
    span = 1.0 - low or 1.0
    last = max(1, len(values) - 1)
    points = [(width * i / last, height * (v - low) / span) for i, v in enumerate(values)]
    return points, height * (0.0 - low) / span


def burn_svg(slo: dict[str, Any], width: int = 640, height: int = 160) -> str:
    """An inline SVG of budget remaining over the period (0% dashed)."""
    pad = 36
    plot_w, plot_h = width - 2 * pad, height - 2 * pad
    points, zero = chart_points(slo["burn"], plot_w, plot_h)
    line = " ".join(f"{pad + x:.1f},{pad + plot_h - y:.1f}" for x, y in points)
    zero_y = pad + plot_h - zero
    last = slo["burn"][-1]["budget_remaining_ratio"]
    title = escape(f"Error budget remaining: {slo['display_name']}")
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" class="burn" viewBox="0 0 {width} {height}" '
        f'width="{width}" height="{height}" role="img" aria-label="{title}">'
        f"<title>{title}</title>"
        f'<rect x="{pad}" y="{pad}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>'
        f'<line x1="{pad}" x2="{pad + plot_w}" y1="{zero_y:.1f}" y2="{zero_y:.1f}" '
        f'stroke="#c33" stroke-dasharray="4 3"/>'
        f'<polyline fill="none" stroke="#2a6fdb" stroke-width="2" points="{line}"/>'
        f'<text x="{pad}" y="{pad - 8}" font-size="11">100%</text>'
        f'<text x="{pad + plot_w}" y="{pad - 8}" font-size="11" text-anchor="end">'
        f"now {last:.1%}</text>"
        f'<text x="{pad}" y="{height - 10}" font-size="11">{escape(slo["burn"][0]["t"][:16])}</text>'
        f'<text x="{pad + plot_w}" y="{height - 10}" font-size="11" text-anchor="end">'
        f"{escape(slo['burn'][-1]['t'][:16])}</text>"
        "</svg>"
    )


def to_pdf(report: dict[str, Any]) -> bytes:
    """The same report as a PDF (ReportLab), burn charts drawn as vector graphics."""
    from reportlab.graphics.shapes import Drawing, Line, PolyLine, Rect
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    styles = getSampleStyleSheet()
    grid = TableStyle(
        [
            ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
            ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eeeeee")),
            ("FONTSIZE", (0, 0), (-1, -1), 8),
        ]
    )
    tenant = report["tenant"]
    story: list[Any] = [
        Paragraph(escape(f"SLO report: {tenant['name']} ({tenant['slug']})"), styles["Title"]),
        Paragraph(escape(f"{report['from']} to {report['to']}"), styles["Normal"]),
        Spacer(0, 12),
    ]
    rows = [["SLO", "SLI", "objective", "achieved", "events", "budget consumed", "alerts"]]
    rows += [
        [
            s["display_name"],
            sli_text(s),
            f"{s['objective']:.3%}",
            ratio_text(s["achieved_ratio"]),
            str(s["total"]),
            f"{s['budget_consumed_ratio']:.1%}",
            str(len(s["alerts"])),
        ]
        for s in report["slos"]
    ]
    story += [Table(rows, style=grid, repeatRows=1), Spacer(0, 12)]
    for slo in report["slos"]:
        width, height = 460, 110
        points, zero = chart_points(slo["burn"], width, height)
        drawing = Drawing(width, height)
        drawing.add(Rect(0, 0, width, height, strokeColor=colors.lightgrey, fillColor=None))
        drawing.add(Line(0, zero, width, zero, strokeColor=colors.red, strokeDashArray=[4, 3]))
        drawing.add(
            PolyLine(
                [c for p in points for c in p],
                strokeColor=colors.HexColor("#2a6fdb"),
                strokeWidth=1.5,
            )
        )
        story += [
            Paragraph(escape(f"Error budget remaining: {slo['display_name']}"), styles["Heading4"]),
            drawing,
            Spacer(0, 8),
        ]
    if report["latency"]:
        rows = [["deployment", "metric", "events", "p50", "p90", "p99", "p99.9"]]
        rows += [
            [
                r["deployment_name"],
                r["metric"],
                str(r["count"]),
                *(seconds_text(r[q]) for q in ("p50", "p90", "p99", "p999")),
            ]
            for r in report["latency"]
        ]
        story += [
            Paragraph("Latency percentiles", styles["Heading3"]),
            Table(rows, style=grid, repeatRows=1),
            Spacer(0, 12),
        ]
    if report["alerts"]:
        rows = [["alert", "SLO", "severity", "started", "ended"]]
        rows += [
            [
                a["alertname"],
                a["slo"] or "",
                a["severity"],
                a["starts_at"][:19],
                (a["ends_at"] or "firing")[:19],
            ]
            for a in report["alerts"]
        ]
        story += [Paragraph("Alerts", styles["Heading3"]), Table(rows, style=grid, repeatRows=1)]
    out = io.BytesIO()
    SimpleDocTemplate(out, pagesize=A4, title=f"SLO report {tenant['slug']}").build(story)
    return out.getvalue()


def sli_text(slo: dict[str, Any]) -> str:
    if slo["threshold_seconds"] is None:
        return str(slo["sli"])
    return f"{slo['sli']} <= {seconds_text(slo['threshold_seconds'])}"


def ratio_text(value: float | None) -> str:
    return "no events" if value is None else f"{value:.3%}"


def seconds_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.3f} s"

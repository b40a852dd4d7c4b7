"""Per-tenant SLO reports for any period: built once as plain data, then rendered as JSON
(the API), HTML (the console, with an inline SVG burn chart), CSV and PDF.

For each SLO, and each revision of its definition in force during the period, the exact
good/total counted under that definition gives the achieved ratio and the share of the
period's error budget consumed (see BUDGET_NOTE: the three always agree); the burn chart
shows the budget remaining in the window of the revision in force (rolling, or the
calendar month) at evenly spaced moments of the period.
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
from controlplane.slo.models import SloRevision
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


BUDGET_NOTE = (
    "achieved = good / events; budget consumed = bad events / allowed bad events, where "
    "allowed bad events = (1 - objective) x events; budget remaining = 1 - budget consumed. "
    "Each revision of an SLO (a change of threshold, objective or window) is reported on "
    "its own, over only the events counted under its definition."
)


def _part(revision: SloRevision, counts: Counts, start: datetime, end: datetime) -> dict[str, Any]:
    """One revision's share of the period, with the figures that make its budget."""
    achieved = counts.achieved()
    consumed = 1.0 - counts.budget_remaining(revision.objective)
    since = revision.counts_from
    return {
        "revision": revision.number,
        "threshold_seconds": revision.threshold_seconds,
        "objective": revision.objective,
        "window": revision.window,
        "from": max(start, since or start).isoformat(),
        "to": min(end, revision.ended_at or end).isoformat(),
        "good": counts.good,
        "total": counts.total,
        "bad": counts.bad,
        "allowed_bad": (1.0 - revision.objective) * counts.total,
        "achieved_ratio": achieved,
        "met": None if achieved is None else achieved >= revision.objective,
        "budget_consumed_ratio": consumed,
        "budget_remaining_ratio": 1.0 - consumed,
    }


def _in_force(revisions: list[SloRevision], moment: datetime) -> SloRevision:
    for revision in reversed(revisions):
        if revision.counts_from is None or revision.counts_from <= moment:
            return revision
    return revisions[0]


def build(tenant: Tenant, start: datetime, end: datetime, now: datetime) -> dict[str, Any]:
    """The report as JSON-ready data. Each SLO lists its revisions' parts of the period
    (`revisions`); its top-level figures are those of the latest one in the period."""
    alerts = selectors.alerts_in_period(tenant.pk, start, end)
    step = (end - start) / (CHART_POINTS - 1)
    moments = [start + step * i for i in range(CHART_POINTS)]
    slos = []
    for slo in selectors.slos_of_tenant(tenant.pk):
        revisions = selectors.revisions_in_period(slo, start, end)
        parts, burn = [], []
        for revision in revisions:
            mine = [(i, t) for i, t in enumerate(moments) if _in_force(revisions, t) == revision]
            windows = {"period": (start, end)}
            windows.update({f"t{i}": (window_start(revision.window, t), t) for i, t in mine})
            counts = selectors.slo_counts(slo, windows, now, revision=revision)
            parts.append(_part(revision, counts["period"], start, end))
            burn += [
                {
                    "t": t.isoformat(),
                    "revision": revision.number,
                    "budget_remaining_ratio": counts[f"t{i}"].budget_remaining(revision.objective),
                }
                for i, t in mine
            ]
        if not parts:  # no revision row in force (repaired data): nothing to report on
            continue
        latest = parts[-1]
        slos.append(
            {
                "id": str(slo.pk),
                "name": slo.name,
                "display_name": slo.display_name or slo.name,
                "sli": slo.sli,
                "scope": slo.scope,
                "deployment": slo.deployment.name if slo.deployment else None,
                "model_name": slo.model_name or None,
                **latest,
                "revisions": parts,
                "burn": burn,
                "alerts": [_alert(a) for a in alerts if a.labels.get("slo") == slo.name],
            }
        )
    return {
        "tenant": {"id": str(tenant.pk), "slug": tenant.slug, "name": tenant.name},
        "from": start.isoformat(),
        "to": end.isoformat(),
        "generated_at": now.isoformat(),
        "budget_note": BUDGET_NOTE,
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
    "revision",
    "from",
    "to",
    "sli",
    "threshold_seconds",
    "objective",
    "good",
    "total",
    "bad",
    "allowed_bad",
    "achieved_ratio",
    "budget_consumed_ratio",
    "budget_remaining_ratio",
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
    """One table: `record` slo rows (objective vs achieved, one per revision in the period),
    then latency rows per deployment."""
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for slo in report["slos"]:
        for part in slo["revisions"]:
            writer.writerow(
                {
                    **slo,
                    **part,
                    "record": "slo",
                    "slo": slo["name"],
                    "alerts": len(slo["alerts"]),
                }
            )
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
        Paragraph(
            escape(f"{time_text(report['from'])} to {time_text(report['to'])}"), styles["Normal"]
        ),
        Spacer(0, 12),
    ]
    rows = [
        ["SLO", "rev.", "SLI", "objective", "achieved", "bad / allowed", "consumed", "remaining"]
    ]
    rows += [
        [
            s["display_name"],
            str(part["revision"]),
            sli_text({**s, **part}),
            f"{part['objective']:.3%}",
            ratio_text(part["achieved_ratio"]),
            f"{part['bad']} / {part['allowed_bad']:.1f} of {part['total']}",
            f"{part['budget_consumed_ratio']:.1%}",
            f"{part['budget_remaining_ratio']:.1%}",
        ]
        for s in report["slos"]
        for part in s["revisions"]
    ]
    story += [
        Table(rows, style=grid, repeatRows=1),
        Spacer(0, 4),
        Paragraph(escape(report["budget_note"]), styles["Italic"]),
        Spacer(0, 12),
    ]
    for slo in report["slos"]:
        story += [
            Paragraph(
                escape(f"Error budget remaining: {slo['display_name']} ({slo['window']})"),
                styles["Heading4"],
            ),
            burn_drawing(slo),
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
                time_text(a["starts_at"]),
                time_text(a["ends_at"]) if a["ends_at"] else "firing",
            ]
            for a in report["alerts"]
        ]
        story += [Paragraph("Alerts", styles["Heading3"]), Table(rows, style=grid, repeatRows=1)]
    out = io.BytesIO()
    SimpleDocTemplate(out, pagesize=A4, title=f"SLO report {tenant['slug']}").build(story)
    return out.getvalue()


def time_text(iso: str) -> str:
    """`2026-05-20 13:47 UTC`: a moment as a person reads it."""
    return f"{datetime.fromisoformat(iso).astimezone(UTC):%Y-%m-%d %H:%M} UTC"


def burn_drawing(slo: dict[str, Any], width: float = 460, height: float = 150) -> Any:
    """Budget remaining over the period as a ReportLab chart: a value axis in percent, a
    time axis in UTC, 0% (the budget spent) dashed, and a legend."""
    from reportlab.graphics.charts.legends import LineLegend
    from reportlab.graphics.charts.lineplots import LinePlot
    from reportlab.graphics.shapes import Drawing, String
    from reportlab.lib import colors

    burn = slo["burn"]
    start = datetime.fromisoformat(burn[0]["t"])
    span_s = max(1.0, (datetime.fromisoformat(burn[-1]["t"]) - start).total_seconds())
    points = [
        (
            (datetime.fromisoformat(p["t"]) - start).total_seconds(),
            100 * p["budget_remaining_ratio"],
        )
        for p in burn
    ]
    low = min(0.0, *(v for _, v in points))
    drawing = Drawing(width, height)
    plot = LinePlot()
    plot.x, plot.y, plot.width, plot.height = 55, 42, width - 75, height - 62
    plot.data = [points, [(0, 0.0), (span_s, 0.0)]]
    plot.lines[0].strokeColor, plot.lines[0].strokeWidth = colors.HexColor("#2a6fdb"), 1.5
    plot.lines[1].strokeColor, plot.lines[1].strokeDashArray = colors.red, [4, 3]
    plot.yValueAxis.valueMin, plot.yValueAxis.valueMax = low, 100.0
    plot.yValueAxis.labelTextFormat = "%.0f%%"
    plot.yValueAxis.labels.fontSize = 7
    plot.xValueAxis.valueMin, plot.xValueAxis.valueMax = 0.0, span_s
    plot.xValueAxis.valueSteps = [span_s * i / 4 for i in range(5)]
    plot.xValueAxis.labelTextFormat = lambda seconds: (
        f"{start + timedelta(seconds=seconds):%m-%d %H:%M}"
    )
    plot.xValueAxis.labels.fontSize = 7
    drawing.add(plot)
    drawing.add(String(4, plot.y + plot.height / 2, "remaining", fontSize=7))
    drawing.add(String(plot.x + plot.width / 2, 20, "time (UTC)", fontSize=7, textAnchor="middle"))
    legend = LineLegend()
    legend.x, legend.y, legend.fontSize = plot.x, 8, 7
    legend.alignment, legend.columnMaximum, legend.dx = "right", 1, 16
    legend.colorNamePairs = [
        (colors.HexColor("#2a6fdb"), "budget remaining in the SLO's window"),
        (colors.red, "0%: budget spent"),
    ]
    drawing.add(legend)
    return drawing


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

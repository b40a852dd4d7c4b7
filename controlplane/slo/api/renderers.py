"""Renderers that turn an SLO report (see `reports.build`) into CSV or PDF downloads."""

from __future__ import annotations

from typing import Any

from rest_framework.renderers import BaseRenderer

from controlplane.slo import reports


class ReportCsvRenderer(BaseRenderer):
    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(
        self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None
    ) -> str:
        return reports.to_csv(data)


class ReportPdfRenderer(BaseRenderer):
    media_type = "application/pdf"
    format = "pdf"
    charset = None
    render_style = "binary"

    def render(
        self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None
    ) -> bytes:
        return reports.to_pdf(data)

"""Thin views over SLO services: CRUD, OpenSLO import/export, and tenant reports."""

from __future__ import annotations

import uuid
from typing import Any

from django.http import Http404, HttpResponse
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.decorators import action
from rest_framework.exceptions import ParseError, ValidationError
from rest_framework.parsers import BaseParser
from rest_framework.renderers import JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import Serializer
from rest_framework.views import APIView

from controlplane.core.api import TenantScopedViewSet
from controlplane.core.scoping import readable_tenant_ids, writable_tenant_ids
from controlplane.slo import openslo, reports, services
from controlplane.slo.api import serializers as s
from controlplane.slo.api.renderers import ReportCsvRenderer, ReportPdfRenderer
from controlplane.slo.filtersets import SloFilterSet
from controlplane.slo.models import Slo
from controlplane.tenancy.models import Tenant


class YamlTextParser(BaseParser):
    """Hands the body over as text; `openslo.parse` reads it (YAML, so JSON too)."""

    media_type = "*/*"

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> str:
        try:
            return stream.read().decode("utf-8") if stream is not None else ""
        except UnicodeDecodeError:
            raise ParseError("The body must be UTF-8 text.") from None


def _tenant_param(request: Request, allowed: set[Any] | None, *, unknown_is_404: bool) -> Tenant:
    """The tenant named by `?tenant=`, among those allowed (None: any). One the caller may
    not use reads as unknown: 404 when it is the object read, else 400."""
    raw = request.query_params.get("tenant", "")
    try:
        tenant_id = uuid.UUID(raw)
    except ValueError:
        raise ValidationError({"tenant": ["Name the tenant by its id (a UUID)."]}) from None
    tenant = Tenant.objects.filter(pk=tenant_id, is_active=True).first()
    if tenant is None or (allowed is not None and tenant.pk not in allowed):
        if unknown_is_404:
            raise Http404
        raise ValidationError({"tenant": [f'Invalid pk "{raw}" - object does not exist.']})
    return tenant


TENANT_PARAMETER = OpenApiParameter("tenant", OpenApiTypes.UUID, required=True)


class SloViewSet(TenantScopedViewSet):
    """Service level objectives; a change rolls their thresholds out to the serving nodes."""

    queryset = Slo.objects.select_related("status", "deployment", "tenant")
    serializer_class = s.SloSerializer
    filterset_class = SloFilterSet
    search_fields = ["name", "display_name", "description"]
    ordering_fields = ["name", "created_at", "objective"]

    def perform_create(self, serializer: Serializer) -> None:
        serializer.instance = services.create_slo(**serializer.validated_data)

    def perform_update(self, serializer: Serializer) -> None:
        serializer.instance = services.update_slo(serializer.instance, **serializer.validated_data)

    def perform_destroy(self, instance: Slo) -> None:
        services.delete_slo(instance)

    @extend_schema(
        parameters=[TENANT_PARAMETER],
        request={"application/yaml": {"type": "string"}},
        responses={200: s.SloSerializer, 201: s.SloSerializer},
    )
    @action(detail=False, methods=["post"], url_path="import", parser_classes=[YamlTextParser])
    def import_openslo(self, request: Request) -> Response:
        """Create (201) or update by name (200) an SLO from one OpenSLO v1 YAML document;
        errors are keyed by the path in the document."""
        tenant = _tenant_param(request, writable_tenant_ids(request.user), unknown_is_404=False)
        slo, created = services.import_openslo(tenant=tenant, text=request.data)
        body = s.SloSerializer(self.get_queryset().get(pk=slo.pk), context={"request": request})
        return Response(
            body.data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK
        )

    @extend_schema(responses={(200, "application/yaml"): OpenApiTypes.STR})
    @action(detail=True, methods=["get"])
    def export(self, request: Request, pk: str | None = None) -> HttpResponse:
        """The SLO as an OpenSLO v1 YAML document."""
        slo = self.get_object()
        response = HttpResponse(openslo.dump(slo), content_type="application/yaml")
        response["Content-Disposition"] = f'attachment; filename="{slo.name}.openslo.yaml"'
        return response


class ReportResponse(Response):
    """A report body (see `reports.build`), which every renderer of the view can render."""


class SloReportView(APIView):
    """A tenant's SLO report for a period: objective vs achieved, budget consumed, burn
    chart points, latency percentiles per deployment and the alerts of the period, as
    JSON, CSV (`format=csv`) or PDF (`format=pdf`)."""

    renderer_classes = [JSONRenderer, ReportCsvRenderer, ReportPdfRenderer]

    @extend_schema(
        parameters=[
            TENANT_PARAMETER,
            OpenApiParameter(
                "from", OpenApiTypes.DATETIME, description="Default: start of this month."
            ),
            OpenApiParameter(
                "to", OpenApiTypes.DATETIME, description="Default (and at most): now."
            ),
            OpenApiParameter("format", OpenApiTypes.STR, enum=["json", "csv", "pdf"]),
        ],
        responses={200: OpenApiResponse(OpenApiTypes.OBJECT)},
    )
    def get(self, request: Request) -> Response:
        tenant = _tenant_param(request, readable_tenant_ids(request.user), unknown_is_404=True)
        now = timezone.now()
        start, end = reports.parse_period(
            request.query_params.get("from"), request.query_params.get("to"), now
        )
        response = ReportResponse(reports.build(tenant, start, end, now))
        fmt = request.accepted_renderer.format
        if fmt in ("csv", "pdf"):
            name = f"slo-report-{tenant.slug}-{start:%Y%m%d}-{end:%Y%m%d}.{fmt}"
            response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        try:
            return super().perform_content_negotiation(request, force)
        except Http404:
            raise ValidationError({"format": ["One of json, csv, pdf."]}) from None

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        """Only a report is CSV or PDF; errors and OPTIONS answers are JSON whatever the
        format asked for."""
        if not isinstance(response, ReportResponse):
            request.accepted_renderer = JSONRenderer()
            request.accepted_media_type = JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)

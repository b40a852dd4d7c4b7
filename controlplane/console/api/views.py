"""Thin snapshot views for the SLO console pages; SLOs the caller may not see are 404."""

from __future__ import annotations

from uuid import UUID

from django.shortcuts import get_object_or_404
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from controlplane.console import selectors
from controlplane.console.api import serializers as s


class SloOverviewView(APIView):
    @extend_schema(
        operation_id="console_slos_list",
        parameters=[s.TenantQuerySerializer],
        responses={200: s.OverviewSerializer},
    )
    def get(self, request: Request) -> Response:
        """Every visible SLO now: state, objective vs achieved, budget and burn rates,
        worst first."""
        # A plain dict: an empty `?tenant=` is then a 400, not a silently absent filter.
        query = s.TenantQuerySerializer(data=request.query_params.dict())
        query.is_valid(raise_exception=True)
        overview = selectors.slo_overview(
            request.user, timezone.now(), query.validated_data.get("tenant")
        )
        return Response(s.OverviewSerializer(overview).data)


class SloDetailView(APIView):
    @extend_schema(
        operation_id="console_slo_retrieve",
        parameters=[s.RangeQuerySerializer],
        responses={200: s.SloDetailSerializer},
    )
    def get(self, request: Request, pk: UUID) -> Response:
        """One SLO: budget over its window; burn rates, percentiles, events, alerts and
        changes over the range."""
        query = s.RangeQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        slo = get_object_or_404(selectors.visible_slos(request.user), pk=pk)
        detail = selectors.slo_detail(
            slo, request.user, timezone.now(), query.validated_data["range"]
        )
        return Response(s.SloDetailSerializer(detail).data)


class FleetHealthView(APIView):
    @extend_schema(responses={200: s.FleetHealthSerializer})
    def get(self, request: Request) -> Response:
        """Pages firing, SLOs by state, nodes not ready."""
        health = selectors.fleet_health(request.user, timezone.now())
        return Response(s.FleetHealthSerializer(health).data)

"""One error shape for the whole API: always a JSON object (see core/schema.py)."""

from __future__ import annotations

from typing import Any

from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(response.data, list):
        # e.g. a filter's bare ValidationError(["..."]): clients expect an object
        response.data = {"detail": " ".join(str(item) for item in response.data)}
    return response

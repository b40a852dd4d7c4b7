"""One error shape for the whole API: always a JSON object (see core/schema.py).

Services refuse with Django's `ValidationError`, keyed by field as `full_clean` does, or
a bare message for the request as a whole; the API answers 400 in the usual shapes.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.serializers import as_serializer_error
from rest_framework.views import exception_handler as drf_exception_handler


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DjangoValidationError):
        exc = ValidationError(
            as_serializer_error(exc)
            if hasattr(exc, "error_dict")
            else {"detail": " ".join(exc.messages)}
        )
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(response.data, list):
        # e.g. a filter's bare ValidationError(["..."]): clients expect an object
        response.data = {"detail": " ".join(str(item) for item in response.data)}
    return response

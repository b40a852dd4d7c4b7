"""One error shape for the whole API: always a JSON object (see core/schema.py).

Services refuse with Django's `ValidationError`, keyed by field as `full_clean` does, or
a bare message for the request as a whole; the API answers 400 in the usual shapes.
A delete the database refuses because other objects still point at the target is a 409
that counts them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Model, ProtectedError, RestrictedError
from rest_framework import status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.response import Response
from rest_framework.serializers import as_serializer_error
from rest_framework.views import exception_handler as drf_exception_handler


class DependentsExist(APIException):
    """409: `owner` cannot go while the counted objects depend on it."""

    status_code = status.HTTP_409_CONFLICT
    default_code = "conflict"

    def __init__(self, owner: str, dependents: Counter[type[Model]]) -> None:
        counts = ", ".join(
            f"{n} {model._meta.verbose_name if n == 1 else model._meta.verbose_name_plural}"
            for model, n in dependents.items()
        )
        super().__init__(f"{owner} still has {counts}; remove them first.")


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ProtectedError):
        exc = DependentsExist("This object", Counter(map(type, exc.protected_objects)))
    elif isinstance(exc, RestrictedError):
        exc = DependentsExist("This object", Counter(map(type, exc.restricted_objects)))
    elif isinstance(exc, DjangoValidationError):
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

"""Pagination for every list endpoint (its own module: DRF imports it at class creation).

Strict about its parameters: `page_size=abc` is a 400, not silently the default.
"""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination


def _positive_int(request: Any, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ValidationError({name: [f"Must be a positive integer, not {raw!r}."]})
    return int(raw)


class Pagination(PageNumberPagination):
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000

    def get_page_size(self, request: Any) -> int:
        size = _positive_int(request, self.page_size_query_param)
        if size is not None and size > self.max_page_size:
            raise ValidationError({self.page_size_query_param: [f"At most {self.max_page_size}."]})
        return self.page_size if size is None else size

    def paginate_queryset(self, queryset: Any, request: Any, view: Any = None) -> Any:
        _positive_int(request, self.page_query_param)
        return super().paginate_queryset(queryset, request, view)

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            parameter["schema"]["minimum"] = 1
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"]["maximum"] = self.max_page_size
        return parameters

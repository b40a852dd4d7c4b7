"""Site-wide error views: API clients get JSON under /api/, never an HTML page."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults


def _json_under_api(
    status: int, message: str, page: Callable[..., HttpResponse]
) -> Callable[..., HttpResponse]:
    def handler(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.path.startswith("/api/"):
            return JsonResponse({"detail": message}, status=status)
        return page(request, *args, **kwargs)

    return handler


bad_request = _json_under_api(400, "Bad request.", defaults.bad_request)
permission_denied = _json_under_api(403, "Permission denied.", defaults.permission_denied)
not_found = _json_under_api(404, "Not found.", defaults.page_not_found)
server_error = _json_under_api(500, "Server error; it has been logged.", defaults.server_error)

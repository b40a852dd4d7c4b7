"""Serving an artifact file with HTTP Range support, so agents resume interrupted downloads.

werkzeug parses the Range header (RFC 9110); one satisfiable range is a 206, a range past
the end a 416, and anything else (none, several, malformed) the whole file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from django.http import HttpResponseBase, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework.request import Request
from rest_framework.response import Response
from werkzeug.http import parse_range_header

CHUNK_BYTES = 1 << 20
RANGE_PARAMETER = OpenApiParameter(
    "Range",
    OpenApiTypes.STR,
    OpenApiParameter.HEADER,
    description="bytes=START-END (one range) to fetch part of the file, e.g. to resume.",
)
RESPONSES = {
    (200, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY, "The file."),
    (206, "application/octet-stream"): OpenApiResponse(OpenApiTypes.BINARY, "The range asked for."),
    416: OpenApiResponse(OpenApiTypes.OBJECT, description="The range starts past the end."),
}


def _chunks(path: Path, start: int, stop: int) -> Iterator[bytes]:
    with path.open("rb") as file:
        file.seek(start)
        while start < stop and (chunk := file.read(min(CHUNK_BYTES, stop - start))):
            start += len(chunk)
            yield chunk


def file_response(request: Request, path: Path, size: int, sha256: str) -> HttpResponseBase:
    """The file, or the one byte range the request asks for."""
    ranges = parse_range_header(request.headers.get("Range"))
    start, stop, status = 0, size, 200
    if ranges is not None and len(ranges.ranges) == 1:
        span = ranges.range_for_length(size)
        if span is None:
            return Response(
                {"detail": f"Range not satisfiable: the file holds {size} bytes."},
                status=416,
                headers={"Content-Range": f"bytes */{size}"},
            )
        (start, stop), status = span, 206
    response = StreamingHttpResponse(
        _chunks(path, start, stop), status=status, content_type="application/octet-stream"
    )
    response["Content-Length"] = str(stop - start)
    response["Accept-Ranges"] = "bytes"
    response["ETag"] = f'"{sha256}"'
    if status == 206:
        response["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return response

"""Serving an artifact file with HTTP Range support, so agents resume interrupted downloads.

werkzeug parses the Range header (RFC 9110); one satisfiable range is a 206, a range past
the end a 416, and anything else (none, several, malformed) the whole file. A file gone
from disk (or not the size recorded) is a 410 that names the artifact, never a short body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from django.core.handlers.asgi import ASGIRequest
from django.http import HttpResponseBase, StreamingHttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response
from werkzeug.http import parse_range_header

from controlplane.storage.models import Artifact

log = logging.getLogger(__name__)

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
    410: OpenApiResponse(
        description="The artifact's file is missing on the control plane; upload it again."
    ),
    416: OpenApiResponse(OpenApiTypes.OBJECT, description="The range starts past the end."),
}


class ArtifactFileGone(APIException):
    status_code = 410
    default_code = "artifact_file_missing"


def _chunks(path: Path, start: int, stop: int) -> Iterator[bytes]:
    with path.open("rb") as file:
        file.seek(start)
        while start < stop and (chunk := file.read(min(CHUNK_BYTES, stop - start))):
            start += len(chunk)
            yield chunk


async def _chunks_async(path: Path, start: int, stop: int) -> AsyncIterator[bytes]:
    """`_chunks` for an ASGI server: Django reads a synchronous iterator whole into memory
    before it sends a byte there (a model of many GiB), and streams an asynchronous one.
    The reads happen on a thread of the download's own, so the event loop never waits for
    the disk, and closing the file (the client left) waits for a read under way."""
    chunks = _chunks(path, start, stop)
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="download") as reader:
        try:
            while (chunk := await loop.run_in_executor(reader, next, chunks, None)) is not None:
                yield chunk
        finally:
            await loop.run_in_executor(reader, chunks.close)


def _check_file(artifact: Artifact) -> None:
    try:
        on_disk: int | None = artifact.path.stat().st_size
    except FileNotFoundError:
        on_disk = None
    if on_disk == artifact.size_bytes:
        return
    problem = (
        "is missing" if on_disk is None else f"holds {on_disk} bytes, not {artifact.size_bytes}"
    )
    log.error(
        "Artifact %s (%s): its file %s %s", artifact.name, artifact.pk, artifact.path, problem
    )
    raise ArtifactFileGone(
        f"The file of artifact {artifact.name} ({artifact.pk}) {problem} on the control plane; "
        "upload the artifact again."
    )


def file_response(request: Request, artifact: Artifact) -> HttpResponseBase:
    """The artifact's file, or the one byte range the request asks for."""
    _check_file(artifact)
    path, size = artifact.path, artifact.size_bytes
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
    chunks = _chunks_async if isinstance(request._request, ASGIRequest) else _chunks
    response = StreamingHttpResponse(
        chunks(path, start, stop), status=status, content_type="application/octet-stream"
    )
    response["Content-Length"] = str(stop - start)
    response["Accept-Ranges"] = "bytes"
    response["ETag"] = f'"{artifact.sha256}"'
    if status == 206:
        response["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
    return response

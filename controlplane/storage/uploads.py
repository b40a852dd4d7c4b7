"""Receiving an artifact upload: straight to disk beside the artifacts, hashed on the way.

The sha256 and size the API stores are computed here from the bytes as they arrive; a
checksum the client sends is only ever compared with them.
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import TemporaryFileUploadHandler
from django.http.multipartparser import MultiPartParserError


class HashingUploadHandler(TemporaryFileUploadHandler):
    """Django's temporary-file handler (into FILE_UPLOAD_TEMP_DIR) that also sha256-hashes."""

    def new_file(self, *args: Any, **kwargs: Any) -> None:
        super().new_file(*args, **kwargs)
        self.hasher = hashlib.sha256()

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes | None:
        if start + len(raw_data) > settings.ARTIFACT_MAX_BYTES:
            raise MultiPartParserError(
                f"an artifact may hold at most {settings.ARTIFACT_MAX_BYTES} bytes"
            )
        self.hasher.update(raw_data)
        return super().receive_data_chunk(raw_data, start)

    def file_complete(self, file_size: int) -> UploadedFile:
        upload = super().file_complete(file_size)
        upload.sha256 = self.hasher.hexdigest()  # type: ignore[attr-defined]
        return upload

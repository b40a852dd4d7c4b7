"""OpenAPI post-processing: document the error responses every operation can give.

drf-spectacular documents success bodies only; clients and schema-driven tests
need to know that 4xx answers exist and what they look like. Views declare the
errors only some operations give (409, 410, 413) with a description; this gives
every error response the one error body.
"""

from __future__ import annotations

from typing import Any

ERROR_SCHEMA = {
    "type": "object",
    "description": (
        'Either {"detail": message} or, for invalid input, an object mapping each '
        "offending field to a list of messages."
    ),
    "properties": {"detail": {"type": "string"}},
    "additionalProperties": True,
}

ERRORS = {
    "400": "Invalid input; the body names each offending field.",
    "401": "Missing or invalid credentials.",
    "403": "Authenticated, but the role does not allow this.",
    "404": "No such object among those visible to the caller (or no such page).",
    "406": "The Accept header asks for a format the API does not produce.",
    "415": "The request body is not JSON.",
}


def add_error_responses(
    result: dict[str, Any], generator: Any, request: Any, public: bool
) -> dict[str, Any]:
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    ref = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, path_item in result.get("paths", {}).items():
        for operation in path_item.values():
            if path.startswith("/api/v1/agent/") and "requestBody" in operation:
                operation["requestBody"]["required"] = True  # an agent message is the body
            responses = operation.setdefault("responses", {})
            for code, description in ERRORS.items():
                responses.setdefault(code, {"description": description})
            for code, response in responses.items():
                if code.startswith("4"):
                    response.setdefault("content", ref)
    return result

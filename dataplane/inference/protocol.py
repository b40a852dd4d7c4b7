"""OpenAI API shapes: request bodies we accept, error bodies, response and chunk bodies.

Requests are validated strictly (wrong types and unknown fields are 400s, as OpenAI
answers them) so a client learns about a typo instead of getting silent defaults.
``ignore_eos`` and ``stream_options.continuous_usage_stats`` are vLLM's extensions,
accepted so benchmark clients written for vLLM work unchanged.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    """An error answered in OpenAI's body shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def validation_error(exc: ValidationError) -> ApiError:
    """The first problem pydantic found, phrased for an API client."""
    first = exc.errors()[0]
    param = ".".join(str(part) for part in first["loc"]) or None
    if first["type"] == "extra_forbidden":
        return ApiError(
            400,
            f"Unrecognized request argument supplied: {param}",
            code="unknown_parameter",
            param=param,
        )
    return ApiError(
        400, f"Invalid value for '{param}': {first['msg']}", code="invalid_value", param=param
    )


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Generation(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
    ignore_eos: bool = False

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        strings = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(strings) > 4 or any(not s for s in strings):
            raise ApiError(
                400, "stop takes up to 4 non-empty strings", param="stop", code="invalid_value"
            )
        return strings


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str] | list[list[int]]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseShape:
    """Builds the bodies of one response, completion or chat, stream or not."""

    def __init__(self, chat: bool, request_id: str, created: int, model: str) -> None:
        self.chat = chat
        self._head = {"id": request_id, "created": created, "model": model}

    def _choice(
        self,
        text: str | None,
        finish_reason: str | None,
        *,
        first: bool = False,
        whole: bool = False,
    ) -> dict[str, Any]:
        """A completion choice, a chat message (``whole``) or a chat delta."""
        if not self.chat:
            return {
                "index": 0,
                "text": text or "",
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        if whole:
            return {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        delta: dict[str, str] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

    def complete(self, text: str, finish_reason: str, usage_: dict[str, int]) -> dict[str, Any]:
        """The non-streaming body."""
        obj = "chat.completion" if self.chat else "text_completion"
        return {
            **self._head,
            "object": obj,
            "choices": [self._choice(text, finish_reason, whole=True)],
            "usage": usage_,
        }

    def chunk(
        self,
        text: str | None,
        finish_reason: str | None = None,
        *,
        first: bool = False,
        usage_: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """One streamed chunk; ``text=None`` with ``finish_reason`` is the closing one."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        body: dict[str, Any] = {
            **self._head,
            "object": obj,
            "choices": [self._choice(text, finish_reason, first=first)],
        }
        if usage_ is not None:
            body["usage"] = usage_
        return body

    def usage_chunk(self, usage_: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head, "object": obj, "choices": [], "usage": usage_}

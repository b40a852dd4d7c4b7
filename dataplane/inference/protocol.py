"""OpenAI API shapes: request bodies we accept, error bodies, response and chunk bodies.

Requests are validated strictly (wrong types and unknown fields are 400s, as OpenAI
answers them) so a client learns about a typo instead of getting silent defaults; a
parameter that is understood but cannot be honoured is a 400 naming it. ``top_k``,
``repetition_penalty``, ``stop_token_ids``, ``ignore_eos`` and
``stream_options.continuous_usage_stats`` are vLLM's extensions, accepted so clients
written for vLLM work unchanged. Sampling fields left out (or null) take the model's
``generation_config.json`` defaults, then OpenAI's. ``response_format`` of type
``json_object`` or ``json_schema`` is served by constrained decoding (``grammar``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dataplane.inference.sampling import MAX_LOGPROBS

MAX_CHOICES = 16


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


def unsupported(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="unsupported_parameter")


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchema(_Body):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and (
            self.json_schema is None or self.json_schema.schema_ is None
        ):
            raise ValueError("type 'json_schema' needs json_schema.schema")
        return self

    def output_schema(self) -> dict[str, Any] | None:
        """The JSON schema the output must follow (any object for ``json_object``, as
        vLLM has it); None for free text."""
        if self.type == "json_object":
            return {"type": "object"}
        if self.type == "json_schema" and self.json_schema is not None:
            return self.json_schema.schema_
        return None


class _Generation(_Body):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    user: str | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    logit_bias: dict[str, float] | None = None
    response_format: ResponseFormat | None = None
    ignore_eos: bool = False

    @property
    def choices(self) -> int:
        return self.n or 1

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        strings = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if len(strings) > 4 or any(not s for s in strings):
            raise ApiError(
                400, "stop takes up to 4 non-empty strings", param="stop", code="invalid_value"
            )
        return strings

    def token_biases(self, vocab: int) -> dict[int, float]:
        """``logit_bias`` with its token-id keys checked against the vocabulary."""
        biases: dict[int, float] = {}
        for key, bias in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab:
                raise ApiError(
                    400,
                    f"logit_bias keys are token ids in [0, {vocab}); got {key!r}",
                    param="logit_bias",
                    code="invalid_value",
                )
            if not -100.0 <= bias <= 100.0:
                raise ApiError(
                    400,
                    "logit_bias values must be between -100 and 100",
                    param="logit_bias",
                    code="invalid_value",
                )
            biases[int(key)] = bias
        return biases


class CompletionRequest(_Generation):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1)
    echo: bool | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        """Raise for what is understood but not served."""
        if self.best_of is not None and self.best_of != self.choices:
            raise unsupported("best_of", "best_of must equal n: every sequence is returned")
        if self.echo:
            raise unsupported("echo", "echo is not supported")
        if self.suffix:
            raise unsupported("suffix", "suffix is not supported")

    def top_logprobs_count(self) -> int | None:
        """How many alternatives to report per token; None for no logprobs."""
        return self.logprobs


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content may be null only in an assistant message with tool_calls")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (vLLM's rendering): text content,
        ``developer`` as ``system``, and tool-call arguments parsed from their JSON."""
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.content
            if not isinstance(self.content, list)
            else "".join(part.text for part in self.content),
        }
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": call.type,
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        return message


def _arguments(text: str) -> Any:
    """Tool-call arguments as JSON values where they parse, else the text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    def check_supported(self) -> None:
        """Raise for what is understood but not served."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(
                400,
                "top_logprobs needs logprobs set to true",
                param="top_logprobs",
                code="invalid_value",
            )

    def top_logprobs_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class LogprobEntry:
    """One output token's log-probability and the alternatives, as text."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


class ResponseShape:
    """Builds the bodies of one response, completion or chat, stream or not.

    ``offsets`` keeps each choice's running text offset for completions' ``text_offset``.
    """

    def __init__(self, chat: bool, request_id: str, created: int, model: str) -> None:
        self.chat = chat
        self._head = {"id": request_id, "created": created, "model": model}
        self._offsets: dict[int, int] = {}

    @property
    def _object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def _logprobs(self, index: int, entries: list[LogprobEntry] | None) -> dict[str, Any] | None:
        if entries is None:
            return None
        if self.chat:
            return {
                "content": [
                    {
                        **_token_logprob(entry.token, entry.logprob),
                        "top_logprobs": [_token_logprob(t, lp) for t, lp in entry.top],
                    }
                    for entry in entries
                ]
            }
        offsets = []
        for entry in entries:
            offsets.append(self._offsets.get(index, 0))
            self._offsets[index] = offsets[-1] + len(entry.token)
        return {
            "tokens": [entry.token for entry in entries],
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{**dict(entry.top), entry.token: entry.logprob} for entry in entries],
            "text_offset": offsets,
        }

    def _choice(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None,
        logprobs: list[LogprobEntry] | None,
        *,
        first: bool = False,
        whole: bool = False,
    ) -> dict[str, Any]:
        """A completion choice, a chat message (``whole``) or a chat delta."""
        choice: dict[str, Any] = {"index": index}
        if not self.chat:
            choice["text"] = text or ""
        elif whole:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            delta: dict[str, str] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        choice["logprobs"] = self._logprobs(index, logprobs)
        choice["finish_reason"] = finish_reason
        return choice

    def complete(
        self,
        choices: list[tuple[str, str, list[LogprobEntry] | None]],
        usage_: dict[str, int],
    ) -> dict[str, Any]:
        """The non-streaming body from each choice's (text, finish_reason, logprobs)."""
        return {
            **self._head,
            "object": self._object,
            "choices": [
                self._choice(index, text, finish, logprobs, whole=True)
                for index, (text, finish, logprobs) in enumerate(choices)
            ],
            "usage": usage_,
        }

    def chunk(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None = None,
        *,
        logprobs: list[LogprobEntry] | None = None,
        first: bool = False,
        usage_: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        """One streamed chunk; ``text=None`` with ``finish_reason`` is the closing one."""
        body: dict[str, Any] = {
            **self._head,
            "object": f"{self._object}.chunk" if self.chat else self._object,
            "choices": [self._choice(index, text, finish_reason, logprobs, first=first)],
        }
        if usage_ is not None:
            body["usage"] = usage_
        return body

    def usage_chunk(self, usage_: dict[str, int]) -> dict[str, Any]:
        obj = f"{self._object}.chunk" if self.chat else self._object
        return {**self._head, "object": obj, "choices": [], "usage": usage_}


def _token_logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

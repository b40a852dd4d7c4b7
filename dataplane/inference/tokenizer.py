"""Text <-> tokens for the worker: ``tokenizer.json`` via the ``tokenizers`` library, and
the model's chat template from ``chat_template.jinja`` (where transformers 4.43 and later
save it) or else ``tokenizer_config.json``, the order transformers loads them in.

Text is encoded with the tokenizer's own special-token rules, so a post-processor that
adds BOS (Llama, Mistral, Gemma) adds it here as it does in transformers and vLLM. Chat
messages are rendered the way transformers' ``apply_chat_template`` renders them: the
model's ``chat_template`` in a sandboxed Jinja2 environment, with ``messages``,
``add_generation_prompt``, the special tokens (``bos_token``, ``eos_token``, ...) and
``raise_exception``; the rendered text is then encoded without adding special tokens,
since the template writes them. A model without a template gets ``DEFAULT_CHAT_TEMPLATE``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from dataplane.inference.model import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, read_json

CHAT_TEMPLATE_FILE = "chat_template.jinja"

# For models that ship none: ``<|ROLE|>\n{content}<|end|>\n`` per message, tool calls as
# their JSON, and ``<|assistant|>\n`` to prompt the reply.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] or [] %}{{ call['function'] | tojson }}{% endfor %}"
    "<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class ChatTemplateError(ValueError):
    """The template refused the messages (``raise_exception``) or failed to render."""


def _raise_exception(message: str) -> NoReturn:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    """transformers' ``tojson``: no HTML escaping, non-ASCII kept."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: text or an AddedToken dict."""
    if isinstance(value, dict):
        content = value.get("content")
        return content if isinstance(content, str) else None
    return value if isinstance(value, str) else None


class TextTokenizer:
    """A model directory's tokenizer plus its chat template."""

    def __init__(self, model_dir: Path) -> None:
        path = model_dir / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"{path} not found: the worker expects tokenizer.json")
        self._tokenizer = Tokenizer.from_file(str(path))
        config = read_json(model_dir / TOKENIZER_CONFIG_FILE)
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (model_dir / CHAT_TEMPLATE_FILE).is_file():
            template = (model_dir / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        self.has_chat_template = isinstance(template, str)
        self._template = _environment().from_string(
            template if isinstance(template, str) else DEFAULT_CHAT_TEMPLATE
        )
        self._special_tokens = {
            key: text for key in _SPECIAL_TOKEN_KEYS if (text := _token_text(config.get(key)))
        }

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def chat_text(self, messages: Sequence[Mapping[str, Any]]) -> str:
        """The prompt text for ``messages`` (OpenAI message dicts) and the reply's turn."""
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, **self._special_tokens
            )
        except TemplateError as exc:
            raise ChatTemplateError(str(exc)) from exc

    def render_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        return self.encode(self.chat_text(messages), add_special_tokens=False)

    def token_text(self, token: int) -> str:
        """One token's text as logprobs report it (special tokens included)."""
        return self._tokenizer.decode([token], skip_special_tokens=False)

    def to_json(self) -> str:
        """``tokenizer.json`` as text, for libraries that index the vocabulary themselves;
        without padding or truncation, which would cut what they tokenize."""
        copy = Tokenizer.from_str(self._tokenizer.to_str())
        copy.no_padding()
        copy.no_truncation()
        return copy.to_str()

    def stream(self) -> Detokenizer:
        return Detokenizer(self._tokenizer)


class Detokenizer:
    """Incremental decoding: text out as soon as the bytes so far form whole characters."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)

    def feed(self, ids: Sequence[int]) -> str:
        # One id per step: given several at once, DecodeStream (tokenizers 0.23) drops
        # text.
        return "".join([self._stream.step(self._tokenizer, token) or "" for token in ids])

"""Text <-> tokens for the worker, via the ``tokenizers`` library and ``tokenizer.json``.

Chat template (documented, used for every model because rendering a model's own Jinja
template would need Jinja): each message becomes ``<|ROLE|>\\n{content}<|end|>\\n`` and
the prompt ends with ``<|assistant|>\\n``. Role markers and ``<|end|>`` are the special
tokens when the vocabulary has them (the synthetic tokenizer does), else plain text.
Message content is encoded separately from the markers, so text that merely looks like
a marker cannot forge one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from dataplane.inference.model import TOKENIZER_FILE


class TextTokenizer:
    """A model directory's tokenizer plus the chat template above."""

    def __init__(self, model_dir: Path) -> None:
        path = model_dir / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"{path} not found: the worker expects tokenizer.json")
        self._tokenizer = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def _marker(self, text: str) -> list[int]:
        token = self._tokenizer.token_to_id(text)
        return [token] if token is not None else self.encode(text)

    def render_chat(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """Token ids of (role, content) messages followed by the assistant's turn."""
        ids: list[int] = []
        end = self._marker("<|end|>")
        for role, content in messages:
            ids += self._marker(f"<|{role}|>") + self.encode("\n" + content) + end
            ids += self.encode("\n")
        return ids + self._marker("<|assistant|>") + self.encode("\n")

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

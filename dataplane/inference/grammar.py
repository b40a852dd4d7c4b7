"""Structured output: ``response_format`` schemas as grammars that constrain decoding.

llguidance, the grammar library vLLM uses, compiles a JSON schema into a grammar and
walks it over the model's own vocabulary, which it reads from ``tokenizer.json``: so
byte-level tokens stand for their bytes, and special tokens never appear inside the
text, except the EOS tokens that end it once the grammar is complete. As in vLLM,
whitespace between JSON tokens is allowed and ``json_object`` is the schema
``{"type": "object"}``.

Compiling is the expensive part (up to a second for a large schema), so each distinct
schema is compiled once into a pristine matcher kept in an LRU; every sequence decodes
with a copy of it, which shares the compiled grammar.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import llguidance
import numpy as np

from dataplane.inference.sampling import BoolArray

log = logging.getLogger(__name__)

# Distinct schemas kept compiled; a client cycling through more only pays compile time.
GRAMMAR_CACHE_SIZE = 256


class GrammarError(ValueError):
    """The schema is not one the grammar library can compile."""


class GrammarMatcher:
    """One sequence's position in its grammar: a ``TokenConstraint`` for the engine."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int) -> None:
        self._matcher = matcher
        self._vocab = vocab

    def allowed(self) -> BoolArray:
        bits = np.frombuffer(self._matcher.compute_bitmask(), np.uint8)
        mask: BoolArray = np.unpackbits(bits, count=self._vocab, bitorder="little").view(np.bool_)
        return mask

    def accept(self, token: int) -> bool:
        if not self._matcher.consume_token(token):
            # Sampled tokens are always allowed: this is the parser exceeding its limits.
            log.warning("grammar refused token %d: %s", token, self._matcher.get_error())
        return self._matcher.is_stopped()


class Grammar:
    """A compiled schema; ``matcher`` starts a sequence at its beginning."""

    def __init__(self, pristine: llguidance.LLMatcher, vocab: int) -> None:
        self._pristine = pristine
        self._vocab = vocab

    def matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._pristine.deep_copy(), self._vocab)


class Grammars:
    """Compiles schemas against one model's tokenizer, each distinct schema once.

    ``tokenizer_json`` is the model's ``tokenizer.json`` text; ``vocab`` the width of
    its logits (which may exceed the tokenizer's vocabulary: the extra ids are never
    allowed); ``eos_token_ids`` the ids that may end a complete output.
    """

    def __init__(self, tokenizer_json: str, vocab: int, eos_token_ids: Sequence[int]) -> None:
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._unusable = ""
        try:
            self._tokenizer = llguidance.LLTokenizer(
                tokenizer_json, n_vocab=vocab, eos_token=list(eos_token_ids)
            )
        except ValueError as exc:  # e.g. a tokenizer.json without a decoder: serve, unconstrained
            self._unusable = str(exc)
            log.warning(
                "structured output is off: the grammar library cannot read the tokenizer (%s)", exc
            )
        self._vocab = vocab
        self._compiled = lru_cache(maxsize=GRAMMAR_CACHE_SIZE)(self._compile)

    def compile(self, schema: Mapping[str, Any]) -> Grammar:
        """The grammar for ``schema``; raises ``GrammarError`` for one it cannot compile.
        Property order matters to the grammar (it writes properties in that order), so
        the cache key keeps it."""
        return self._compiled(json.dumps(schema, separators=(",", ":")))

    def _compile(self, schema: str) -> Grammar:
        if self._tokenizer is None:
            raise GrammarError(f"this model's tokenizer cannot drive a grammar ({self._unusable})")
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": True}
            )
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return Grammar(matcher, self._vocab)

"""Structured outputs through llguidance (one of vLLM's backends): a GrammarSpec becomes llguidance's
grammar, compiled once per spec for the model's tokenizer; each request advances its own copy, which says
per step which tokens may come next (as a bitmask) and when the grammar is complete.

No torch here: the HTTP layer checks specs with `grammar_error` before admission."""

from __future__ import annotations

import collections
import functools
import json
from collections.abc import Collection, Sequence
from typing import Any

import llguidance
import llguidance.numpy
import numpy as np

from llm_server.engine.interface import GrammarSpec

# Between JSON tokens: a space, or a line break or two and up to 20 spaces or tabs of indent (llama.cpp's
# rule). Pretty-printed JSON fits; a model cannot loop on whitespace, which llguidance's default (any run
# of it) lets a weak model do until max_tokens. A schema's own "x-guidance" options replace this.
JSON_WHITESPACE = r"(\x20|\n{1,2}[\x20\t]{0,20})"
CACHE_SIZE = 64  # compiled grammars kept (schemas repeat: one per client-side pydantic model)


def grammar_text(spec: GrammarSpec) -> str:
    """llguidance's serialized grammar for a spec (not checked yet)."""
    if spec.kind in ("json_schema", "json_object"):
        schema = json.loads(spec.value) if spec.kind == "json_schema" else {"type": "object"}
        own_options = isinstance(schema, dict) and "x-guidance" in schema  # ours would override them
        defaults = None if own_options else {"whitespace_pattern": JSON_WHITESPACE}
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=defaults)
    return llguidance.grammar_from(spec.kind, spec.value)


def grammar_error(spec: GrammarSpec) -> str | None:
    """llguidance's reason for refusing a spec, or None. Needs no tokenizer, so the HTTP layer can answer
    a bad schema, regex or grammar with a 400 instead of a failed generation."""
    try:
        text = grammar_text(spec)
    except ValueError as error:  # a GBNF grammar that does not convert, a choice list that is not JSON
        return str(error)
    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text)
    return messages[0] if failed else None


class GrammarCompiler:
    """The engine's grammars for one tokenizer: an LRU of compiled (never advanced) matchers keyed on the
    spec, and a copy of one for each request. Used from the engine's worker thread only."""

    def __init__(self, tokenizer: Any, vocab: int, end_ids: Collection[int], cache_size: int = CACHE_SIZE):
        self._hf_tokenizer = tokenizer
        self._vocab = max(vocab, len(tokenizer))  # the logits may be wider (a padded embedding) or narrower
        self._end_ids = sorted(end_ids)  # allowed exactly when the grammar accepts
        self._compiled: collections.OrderedDict[GrammarSpec, llguidance.LLMatcher] = collections.OrderedDict()
        self._cache_size = cache_size

    @functools.cached_property
    def tokenizer(self) -> llguidance.LLTokenizer:
        # The vocabulary's token trie: about a second for a 128k vocabulary, so only once a request asks.
        import llguidance.hf  # transformers, which the engine has loaded anyway

        return llguidance.hf.from_tokenizer(self._hf_tokenizer, self._vocab, eos_token=self._end_ids or None)

    def matcher(self, spec: GrammarSpec) -> llguidance.LLMatcher:
        """A fresh matcher for one request (a deep copy of the compiled one: microseconds)."""
        compiled = self._compiled.pop(spec, None)
        if compiled is None:
            compiled = llguidance.LLMatcher(self.tokenizer, grammar_text(spec), log_level=0)
            if compiled.is_error():  # the HTTP layer checked it: only a limit that needs the vocabulary
                raise ValueError(compiled.get_error())
        self._compiled[spec] = compiled
        while len(self._compiled) > self._cache_size:
            self._compiled.popitem(last=False)
        return compiled.deep_copy()

    def bitmask(self, rows: int, matchers: Sequence[tuple[int, llguidance.LLMatcher]]) -> np.ndarray:
        """(rows, words) int32: bit t % 32 of word t // 32 set where token t may come next, for each (row,
        matcher); every bit set on the other rows. One matcher after the other: llguidance's thread pool
        costs more than it saves on small batches."""
        bitmask = np.full((rows, (self.tokenizer.vocab_size + 31) // 32), -1, dtype=np.int32)
        for row, matcher in matchers:
            llguidance.numpy.fill_next_token_bitmask(matcher, bitmask, row)  # releases the GIL
        return bitmask

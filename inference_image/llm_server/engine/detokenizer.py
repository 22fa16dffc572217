"""Incremental detokenization that never emits half of a multi-byte character.

tokenizers' own DecodeStream (Rust) does the work per token; the text it holds back at the end (bytes
that never completed a character) is flushed as the full decode would render it.
"""

from typing import Any

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        self._stream = DecodeStream(skip_special_tokens=True)
        self._ids: list[int] = []
        self._emitted = 0  # characters handed out so far

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        text = self._stream.step(self._backend, token_id) or ""
        self._emitted += len(text)
        return text

    def flush(self) -> str:
        """Whatever is still held back (at the end of a generation)."""
        full = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        rest = full[self._emitted :]
        self._emitted = len(full)
        return rest

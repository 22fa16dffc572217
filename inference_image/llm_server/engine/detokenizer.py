"""Incremental detokenization that never emits half of a multi-byte character."""

from typing import Protocol


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Decodes a growing token list window by window (as vLLM does): O(window) per token, not O(n)."""

    def __init__(self, tokenizer: Decoder, window: int = 6) -> None:
        self._tokenizer = tokenizer
        self._window = window
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context decoded again for correct spacing
        self._read_offset = 0  # tokens up to here have been emitted as text

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self._prefix_offset = max(self._read_offset - self._window, 0)
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Whatever is still held back (at the end of a generation)."""
        rest = self._decode(self._ids[self._prefix_offset :])[
            len(self._decode(self._ids[self._prefix_offset : self._read_offset])) :
        ]
        self._read_offset = len(self._ids)
        return rest

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

"""Attention for a step that decodes the running requests and prefills newcomers' prompts in one forward.

The step's tokens are the batch rows, one token each (input shape (tokens, 1)): every linear layer, and
peft's per-row adapter choice, sees all tokens of all requests at once, so a prompt joins the forward
that decodes the others instead of stalling them with a forward of its own (on a CPU its tokens then cost
about half as much, measured in docs/performance.md). Only attention needs to know whose token is whose:
decoding rows attend over their cache rows (one batched SDPA with the padding mask), each prompt attends
causally over its own tokens. slots.py writes the keys and values where these views expect them.

Registered with transformers as an attention implementation. A forward without a step plan (for example
`model.generate` on the same model) gets transformers' own SDPA attention and mask, unchanged.
"""

from __future__ import annotations

import dataclasses

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

SLOT_ATTENTION = "llm_server_slots"


@dataclasses.dataclass(frozen=True)
class Prefill:
    """A prompt, or the next chunk of one, in this step."""

    row: int  # the request's row of the cache
    offset: int  # index of its first token among the step's tokens
    length: int  # its tokens in this step
    past: int  # the prompt's tokens already in the cache (earlier chunks)
    keys_to: int  # end of this chunk's columns in the step's cache view; the prompt's keys end there
    final: bool  # the prompt's last chunk: its last token's logits give the first generated token

    @property
    def keys(self) -> slice:
        return slice(self.keys_to - self.past - self.length, self.keys_to)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Who is who in one step: rows [0, decoding) decode one token each, then prompts or prompt chunks."""

    decoding: int
    prefills: tuple[Prefill, ...]
    decode_mask: torch.Tensor  # (decoding, 1, 1, width), True where a decoding row may attend

    @property
    def tokens(self) -> int:
        return self.decoding + sum(prefill.length for prefill in self.prefills)

    def last_tokens(self) -> list[int]:
        """The step's tokens whose next-token logits are needed: every decoding row, each finished prompt's
        last token."""
        return list(range(self.decoding)) + [p.offset + p.length - 1 for p in self.prefills if p.final]


def slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    slot_step: StepPlan | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """query: (tokens, heads, 1, head_dim); key/value: the cache rows (rows, kv_heads, width, head_dim)."""
    if slot_step is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    # A sliding-window layer (Mistral, Qwen2, Gemma 3 local layers) sees only the last `window` positions.
    window = kwargs.get("sliding_window")
    parts = []
    decoding = slot_step.decoding
    if decoding:
        keys, values = key[:decoding], value[:decoding]
        mask = slot_step.decode_mask.to(query.device, non_blocking=True)  # a no-op on one device
        if isinstance(window, int) and keys.shape[2] > window:  # rows end together: the last columns
            keys, values, mask = keys[:, :, -window:], values[:, :, -window:], mask[..., -window:]
        out, _ = sdpa_attention_forward(module, query[:decoding], keys, values, mask, scaling=scaling)
        parts.append(out)  # (decoding, 1, heads, head_dim)
    for prefill in slot_step.prefills:
        tokens = slice(prefill.offset, prefill.offset + prefill.length)
        rows = slice(prefill.row, prefill.row + 1)
        out, _ = sdpa_attention_forward(
            module,
            query[tokens].transpose(0, 2),  # (1, heads, length, head_dim)
            key[rows, :, prefill.keys],
            value[rows, :, prefill.keys],
            causal_mask(prefill.length, prefill.past, window, query.device),
            scaling=scaling,
            is_causal=True,
        )
        parts.append(out.transpose(0, 1))  # (length, 1, heads, head_dim)
    return (torch.cat(parts) if len(parts) > 1 else parts[0]), None


def causal_mask(length: int, past: int, window: object, device: torch.device) -> torch.Tensor | None:
    """Query i (position past + i) sees keys up to its own position, and within `window` of it when set;
    None where SDPA's own causal mask is the same (no earlier chunk, no window cut)."""
    windowed = isinstance(window, int) and past + length > window
    if past == 0 and not windowed:
        return None
    query = torch.arange(past, past + length, device=device)[:, None]
    key = torch.arange(past + length, device=device)[None, :]
    allowed = key <= query
    if windowed:
        allowed &= key > query - window  # type: ignore[operator]
    return allowed[None, None]


AttentionInterface.register(SLOT_ATTENTION, slot_attention)
AttentionMaskInterface.register(SLOT_ATTENTION, sdpa_mask)

"""What the HTTP layer may know of an engine: requests in, text deltas (generation) or vectors (pooling:
embed, classify, score) out. No torch here."""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal, Protocol

Task = Literal["generate", "embed", "classify", "score"]
PoolKind = Literal["embed", "classify", "score"]


class EngineError(Exception):
    """Base of the errors the HTTP layer maps to responses."""


class QueueFull(EngineError):
    def __init__(self, waiting: int) -> None:
        super().__init__(f"the server is at capacity ({waiting} requests waiting); retry shortly")


class ContextTooLong(EngineError):
    pass


class UnknownModel(EngineError):
    pass


class MessagesRejected(EngineError):
    """The model's chat template refused the conversation (or the model has none)."""


class AdapterError(EngineError):
    pass


class InvalidInput(EngineError):
    """An input the model cannot take: nothing left after tokenization, a token id outside its vocabulary."""


@dataclasses.dataclass(frozen=True)
class GrammarSpec:
    """What a generation must match (structured outputs). `value`: the JSON schema as JSON text
    (json_schema; empty for json_object: any object), the regex (matched whole), the choices as a JSON list
    of strings, or the grammar in llguidance's Lark dialect or llama.cpp's GBNF."""

    kind: Literal["json_schema", "json_object", "regex", "choice", "grammar"]
    value: str


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """vLLM's sampling parameters, with its defaults (each off unless set)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    min_p: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # until then, neither an end-of-generation token nor a stop token is sampled
    repetition_penalty: float = 1.0  # on tokens of the prompt and the output (as vLLM and transformers)
    presence_penalty: float = 0.0  # on tokens of the output (as OpenAI and vLLM)
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # each sampled token's log probability, and this many of the most likely
    prompt_logprobs: int | None = None  # the same for every prompt token (the first has none)
    grammar: GrammarSpec | None = None  # structured outputs: only the tokens it allows, ended when complete
    cache_salt: str | None = None  # only requests with the same salt share prefix-cache blocks

    @property
    def adjusts_logits(self) -> bool:
        """Whether its row's logits change before sampling (rows that do not skip that work)."""
        return bool(
            self.min_tokens
            or self.logit_bias
            or self.repetition_penalty != 1.0
            or self.presence_penalty
            or self.frequency_penalty
            or self.grammar is not None
        )


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A tokenized prompt for one model name (the base model or an adapter)."""

    model: str
    token_ids: tuple[int, ...]
    text: str = ""  # what the client sent, for LLM_LOG_PROMPTS only


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log probability under the model's raw distribution (before penalties and temperature, as
    vLLM's default `raw_logprobs`), its rank there (1: the most likely) and the `top` most likely tokens."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[tuple[int, float], ...] = ()  # (token id, log probability), most likely first


@dataclasses.dataclass(frozen=True)
class Delta:
    """New text since the last delta; `finish_reason` set on the last one ("stop" or "length")."""

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    token_ids: tuple[int, ...] = ()  # the tokens sampled since the last delta (text may lag behind them)
    logprobs: tuple[TokenLogprob, ...] = ()  # of those tokens, when the request asked
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # on the first delta, when asked


@dataclasses.dataclass(frozen=True)
class ModelCard:
    name: str
    parent: str | None
    path: str


STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclasses.dataclass
class StepTimes:
    """How long the engine's steps took: every running stream waits one step per token, so the slowest
    steps are the longest pauses any stream sees from the engine (bucketed as a Prometheus histogram)."""

    counts: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(STEP_BUCKETS) + 1))
    total_seconds: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(STEP_BUCKETS, seconds)] += 1
        self.total_seconds += seconds


@dataclasses.dataclass(frozen=True)
class PoolInput:
    """One tokenized input of a pooling request (a text, or a pair of texts for a cross-encoder)."""

    token_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...] | None = None  # the segments of a pair, for models that take them


@dataclasses.dataclass(frozen=True)
class PoolingInfo:
    """What a pooling model's outputs look like, for the checks the HTTP layer makes before admission."""

    embedding_width: int | None = None  # embed: the size of its vectors
    is_matryoshka: bool = False  # embed: `dimensions` may shorten them
    matryoshka_dimensions: tuple[int, ...] | None = None  # embed: only to these
    labels: tuple[str, ...] = ()  # classify and score: the classifier's labels by index


class PoolHandle(Protocol):
    async def result(self) -> list[list[float]]:
        """One list per input: the embedding, the class probabilities, or [score]."""
        ...

    def cancel(self) -> None:
        """Drops what has not been computed yet (the client left or timed out); a no-op once answered."""


class ServingEngine(Protocol):
    """What /health, /metrics, /v1/models, the drain and the lifespan read, whatever the task."""

    @property
    def task(self) -> Task: ...

    @property
    def tasks(self) -> frozenset[Task]:
        """Every task it serves: its own and the companions (an embedding model also scores)."""
        ...

    @property
    def base_model(self) -> str: ...

    @property
    def max_model_len(self) -> int: ...

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (transformers'), for /tokenize's token strings and /detokenize."""
        ...

    @property
    def running(self) -> int: ...

    @property
    def waiting(self) -> int: ...

    @property
    def generated_tokens(self) -> int:
        """Tokens decoded so far, for every request, also those whose client left."""
        ...

    @property
    def cache_usage(self) -> float:
        """The share of the KV-cache budget its requests hold, 0 to 1 (load balancers route on it)."""
        ...

    @property
    def step_times(self) -> StepTimes:
        """Durations of its batched steps (empty for an engine without steps)."""
        ...

    @property
    def prefix_cache_tokens(self) -> tuple[int, int]:
        """(prompt tokens looked up in the prefix cache, of which found there) since start."""
        ...

    def models(self) -> list[ModelCard]: ...

    def adapters_in_use(self) -> tuple[list[str], list[str]]:
        """(running, waiting) adapter names."""

    async def load_adapter(self, name: str, path: str) -> None: ...

    async def replace_adapter(self, name: str, path: str) -> None:
        """Serves `name` from `path`, loaded or not; requests admitted before keep their version."""
        ...

    async def unload_adapter(self, name: str) -> None: ...

    def shutdown(self) -> None: ...


class Engine(ServingEngine, Protocol):
    """Generation: prompts in, text deltas out."""

    @property
    def vocab_size(self) -> int:
        """The width of its logits: token ids below it may be biased, stopped on or sent."""
        ...

    def encode_chat(
        self, model: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> Prompt:
        """Messages as chat templates read them (a call's arguments an object) and the tools in OpenAI's
        shape, rendered by the model's template (which may ignore the tools)."""
        ...

    def encode_text(self, model: str, text: str) -> Prompt: ...

    def check_budget(self, prompt: Prompt, max_tokens: int) -> None:
        """Raises ContextTooLong naming the lengths when prompt + max_tokens does not fit."""

    def generate(self, prompt: Prompt, params: SamplingParams) -> AsyncIterator[Delta]:
        """Admits the request at once (or raises QueueFull); closing the iterator cancels the generation."""


class PoolingEngine(ServingEngine, Protocol):
    """Embed, classify, score: inputs in, one vector per input out, batched across requests."""

    @property
    def info(self) -> PoolingInfo: ...

    def encode_text(self, model: str, text: str, truncate: int | None, add_special_tokens: bool) -> PoolInput:
        """Raises UnknownModel, ContextTooLong naming the limit and the length (unless `truncate` cuts it to
        that many tokens) or InvalidInput."""
        ...

    def encode_ids(self, model: str, token_ids: Sequence[int], truncate: int | None) -> PoolInput:
        """Token ids as the client sent them (no special tokens added)."""
        ...

    def encode_pair(self, model: str, first: str, second: str, truncate: int | None) -> PoolInput:
        """A text pair for a cross-encoder, in the tokenizer's pair format."""
        ...

    def pool(self, kind: PoolKind, inputs: list[PoolInput], dimensions: int | None = None) -> PoolHandle:
        """Admits all the inputs now, or raises QueueFull."""
        ...

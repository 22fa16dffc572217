"""Request and response bodies: OpenAI's shapes (vLLM's for classify, score and rerank), and the simple API
of the seed services."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from llm_server.config import AdapterSource

MAX_MESSAGES = 4096
MAX_PROMPT_CHARS = 1_000_000
MAX_INPUTS = 2048  # OpenAI's bound on the inputs of one embeddings request
MAX_CHOICES = 128
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this server does not use

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """Clients send `null` for fields they leave unset (vLLM's fields are Optional): the default, where
        the field itself takes no null (where it does, null keeps its meaning: max_tokens null, no limit)."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None or (key in fields and type(None) in get_args(fields[key].annotation))
        }


class SamplingFields(_Request):
    """OpenAI's sampling fields and vLLM's extensions, with vLLM's bounds and defaults."""

    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0  # 0 or -1: every token
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    # A 64-bit seed, as torch's generators take: a larger one is a 400 here, not a failed generation later.
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1024)] | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)
    min_tokens: Annotated[int, Field(ge=0)] = 0
    # vLLM's: mixed into the prefix cache's hashes, so that only requests with the same salt share cached
    # blocks (one tenant cannot learn another's prompts from how fast its own are answered).
    cache_salt: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # Bounded so that logits / penalty stays finite (a penalty of 1e-300 made every logit inf: NaN)
    repetition_penalty: Annotated[float, Field(ge=0.01, le=10.0)] = 1.0
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    # OpenAI's shape: token ids as strings, biases within [-100, 100]
    logit_bias: (
        Annotated[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]], Field(max_length=1024)] | None
    ) = None

    @field_validator(
        "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"
    )
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not key.isdigit():
                raise ValueError(f"keys are token ids; {key[:40]!r} is not one")
        return value

    def logit_biases(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(key), bias) for key, bias in (self.logit_bias or {}).items())

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str
    arguments: str | dict[str, Any]  # OpenAI sends JSON text; vLLM takes an object too

    @field_validator("arguments")
    @classmethod
    def _an_object(cls, value: str | dict[str, Any]) -> dict[str, Any]:
        """Kept as the object chat templates read (transformers' convention): they serialize it."""
        if isinstance(value, dict):
            return value
        try:
            parsed = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object, or one as text")
        return parsed


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # null: an assistant turn that only called tools, as OpenAI's history sends it
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | list[TextPart] | None = None
    name: str | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_MESSAGES)] | None = None  # assistant turns
    tool_call_id: str | None = None  # role "tool": the call it answers

    @model_validator(mode="after")
    def _tool_calls_from_the_assistant(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        return self

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: content as text, a call's arguments as an object."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
                for call in self.tool_calls
            ]
        return message


class FunctionDefinition(BaseModel):
    name: Annotated[str, Field(min_length=1)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: the function takes no arguments
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIFields(SamplingFields):
    """What both OpenAI endpoints share. Fields it does not declare are kept (`model_extra`) for
    vllm_fields.check_fields: one this server does not implement is a 400 naming it, not a 200 that quietly
    lacks it."""

    model_config = ConfigDict(extra="allow")

    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None  # vLLM's
    # Structured outputs (api/structured_outputs.py): OpenAI's response_format, vLLM's structured_outputs
    # ({"json", "regex", "choice", "grammar", "json_object"}) and its older guided_* fields; one at most.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("response_format")
    @classmethod
    def _response_format_shape(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        kind = (value or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type {kind!r} is not supported (text, json_object or json_schema)")
        if kind == "json_schema":
            assert value is not None
            spec = value.get("json_schema")
            if not (isinstance(spec, dict) and isinstance(spec.get("name"), str)):
                raise ValueError("json_schema needs an object with a name and a schema")
            if not isinstance(spec.get("schema"), dict):
                raise ValueError("json_schema.schema must be a JSON schema object")
            if not isinstance(spec.get("strict", False), bool | None):
                raise ValueError("json_schema.strict must be a boolean")
        return value

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> OpenAIFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self


class ChatCompletionRequest(OpenAIFields):
    model: str | None = None  # vLLM: the served model when absent
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1)] = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    # Tool calling (api/tools.py): rendered by the chat template, read back from the output or forced.
    tools: Annotated[list[Tool], Field(max_length=MAX_INPUTS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        return self


PromptText = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
PromptIds = Annotated[list[Annotated[int, Strict(), Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(OpenAIFields):
    model: str | None = None  # vLLM: the served model when absent
    # OpenAI's four forms: a text, texts, token ids, lists of token ids (lm-eval sends the last)
    prompt: (
        PromptText
        | Annotated[list[PromptText], Field(min_length=1, max_length=MAX_INPUTS)]
        | PromptIds
        | Annotated[list[PromptIds], Field(min_length=1, max_length=MAX_INPUTS)]
    )
    max_tokens: Annotated[int | None, Field(ge=0)] = 16  # 0: the prompt's log probabilities only (echo)
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    return_token_ids: bool = False  # vLLM's: each choice also carries prompt_token_ids and token_ids

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and isinstance(self.prompt[0], int):
            return [self.prompt]  # type: ignore[list-item]
        return list(self.prompt)  # type: ignore[arg-type]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class SimpleChatRequest(SamplingFields):
    """The seed services' /chat: messages, and the server's own model unless `model` names an adapter."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    model: str | None = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    stream: bool = False


class GenerateRequest(SamplingFields):
    prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    model: str | None = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9
    stream: bool = False


class BatchRequest(SamplingFields):
    prompts: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]],
        Field(min_length=1, max_length=64),
    ]
    model: str | None = None
    max_tokens: Annotated[int | None, Field(ge=1)] = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 0.9


class SimpleChatResponse(BaseModel):
    response: str
    usage: Usage
    model: str


class GenerateResponse(BaseModel):
    generated_text: str
    usage: Usage
    model: str


class BatchResponse(BaseModel):
    results: list[str]
    usage: Usage
    model: str


Text = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=MAX_INPUTS)]
TokenIds = Annotated[list[Annotated[int, Strict(), Field(ge=0)]], Field(min_length=1)]
# OpenAI's input: a text, texts, one token list or token lists.
PoolingInputs = (
    Text | Texts | TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_INPUTS)]
)


class PoolingFields(_Request):
    """vLLM's extensions that every pooling request takes."""

    truncate_prompt_tokens: int | None = Field(
        None, description="Keep this many tokens of each input (-1: the model's limit) instead of a 400."
    )

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _positive_or_model_limit(cls, value: int | None) -> int | None:
        if value is not None and value != -1 and value < 1:
            raise ValueError("must be -1 (the model's limit) or at least 1")
        return value


class EmbeddingRequest(PoolingFields):
    model: str
    input: PoolingInputs
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int | None, Field(ge=1)] = None
    user: str | None = None
    add_special_tokens: bool = True  # vLLM's: off for texts that already carry them


class ClassificationRequest(PoolingFields):
    model: str | None = None  # vLLM's: the served model when absent
    input: PoolingInputs
    user: str | None = None
    add_special_tokens: bool = True


class ScoreRequest(PoolingFields):
    """Pairs 1:1, 1:N (text_1 scored against each text_2) or N:N."""

    model: str | None = None
    text_1: Text | Texts
    text_2: Text | Texts
    user: str | None = None


class RerankRequest(PoolingFields):
    model: str | None = None
    query: Text
    documents: Texts
    top_n: Annotated[int, Field(ge=0)] = 0  # 0: every document
    user: str | None = None


class PredictRequest(BaseModel):
    """The seed services' /predict."""

    text: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
    return_probabilities: bool = False


class PoolingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int) -> PoolingUsage:
        return cls(prompt_tokens=prompt_tokens, total_tokens=prompt_tokens)


class EmbeddingData(BaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str  # base64: little-endian float32, as OpenAI's


class EmbeddingResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[EmbeddingData]
    usage: PoolingUsage


class SeedEmbeddingsResponse(BaseModel):
    embeddings: list[list[float]]


class ClassificationData(BaseModel):
    index: int
    label: str
    probs: list[float]
    num_classes: int


class ClassificationResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: PoolingUsage


class ScoreData(BaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(BaseModel):
    id: str
    object: Literal["list"] = "list"
    created: int
    model: str
    data: list[ScoreData]
    usage: PoolingUsage


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    document: RerankDocument
    relevance_score: float


class RerankResponse(BaseModel):
    id: str
    model: str
    usage: PoolingUsage
    results: list[RerankResult]


class PredictResponse(BaseModel):
    """Seed 000's fields (sentiment, confidence, probabilities by label) and seed 002's prediction (the
    class index), with the label under its own name."""

    text: str
    label: str
    sentiment: str
    confidence: float
    prediction: int
    probabilities: dict[str, float] | None = None


class LoadLoraRequest(BaseModel):
    lora_name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")]
    lora_path: Annotated[str, Field(min_length=1)]


class AdapterEntry(AdapterSource):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][-A-Za-z0-9_.]*$")]


class AdapterSetRequest(BaseModel):
    """The whole set to serve: adapters not listed are removed."""

    model_config = ConfigDict(extra="forbid")

    adapters: Annotated[list[AdapterEntry], Field(max_length=256)]

    @field_validator("adapters")
    @classmethod
    def _unique_names(cls, adapters: list[AdapterEntry]) -> list[AdapterEntry]:
        names = [adapter.name for adapter in adapters]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"adapter names must be unique; repeated: {', '.join(repeated)}")
        return adapters


class AdapterStatus(BaseModel):
    name: str
    source: str
    revision: str | None
    state: Literal["Pending", "Loading", "Ready", "Failed"]
    reason: str | None


class AdapterSetResponse(BaseModel):
    adapters: list[AdapterStatus]


class UnloadLoraRequest(BaseModel):
    lora_name: Annotated[str, Field(min_length=1)]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_responses(*codes: int) -> dict[int | str, dict[str, object]]:
    """OpenAPI entries for the error statuses a route can answer (all in the one error shape)."""
    return {code: {"model": ErrorResponse} for code in codes}


STREAMABLE = {200: {"content": {"application/json": {}, "text/event-stream": {}}}}

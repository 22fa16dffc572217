"""Every knob of the server, as an LLM_* environment variable (the operator's ConfigMap sets them)."""

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ADAPTER_SOURCE_PATTERN = r"^(hf://[A-Za-z0-9][-A-Za-z0-9_.]*(/[A-Za-z0-9][-A-Za-z0-9_.]*)?|file:///\S+|/\S*)$"


class AdapterSource(BaseModel):
    """Where an adapter comes from: a directory here, or a hub repo the server downloads itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(pattern=ADAPTER_SOURCE_PATTERN, description="hf://org/repo, file:///dir or /dir.")
    revision: str | None = Field(None, max_length=128, description="Branch, tag or commit (hf:// only).")

    @model_validator(mode="after")
    def _revision_only_for_hub(self) -> "AdapterSource":
        if self.revision is not None and not self.source.startswith("hf://"):
            raise ValueError("revision applies only to hf:// sources")
        return self


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLM_", frozen=True)

    model: Path = Field(description="Directory of the base model (transformers format).")
    adapters: dict[str, AdapterSource] = Field(
        default_factory=dict,
        description='LoRA adapters, name to a directory or a source; as JSON: {"support": "/dir", "sql": '
        '{"source": "hf://org/sql-lora", "revision": "v2"}}. One that fails to load is reported (GET '
        "/v1/adapters) and the rest are served.",
    )
    max_lora_rank: int = Field(64, ge=1, description="Adapters of a higher rank are refused (vLLM's limit).")
    download_dir: Path = Field(
        Path.home() / ".cache" / "llm-server" / "models",
        description="Where hf:// adapters are downloaded to, one directory per repo and revision.",
    )
    served_model_name: str | None = Field(
        None, description="Model name clients send; default: the model dir name."
    )
    task: Literal["auto", "generate", "embed", "classify", "score"] = Field(
        "auto",
        description="What the model serves: generate (completions, chat), embed (/v1/embeddings), classify "
        "(/classify, /predict) or score (/score, /rerank: a cross-encoder); auto: a sentence-transformers "
        "model embeds, a *ForSequenceClassification scores with one label and classifies with more, "
        "anything else generates.",
    )
    host: str = "0.0.0.0"
    port: int = 8000
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_model_len: int | None = Field(None, ge=16, description="Context cap; default: the model's own.")
    max_new_tokens: int | None = Field(
        None, ge=1, description="Most tokens one request may generate; default: the rest of the context."
    )
    default_max_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens generated when a request names no limit; default: the rest of the context, as "
        "vLLM (each request holds prompt + max_tokens of LLM_MAX_BATCH_TOKENS while it runs: on a long "
        "context set this lower).",
    )
    max_batch_size: int = Field(
        32,
        ge=1,
        description="Requests decoded together in one step (embed, classify, score: inputs per forward).",
    )
    max_batch_tokens: int = Field(
        65536,
        ge=16,
        description="Cache budget of the batch: prompt + max_tokens summed over its requests (embed, "
        "classify, score: the tokens of one forward, its rows x the longest when padded).",
    )
    pooling_workers: int | None = Field(
        None,
        ge=1,
        description="Embed, classify, score: forwards run at once, each on one CPU thread (on a shared "
        "machine one thread each beats all threads on one forward: no thread waits for a preempted "
        "sibling); default: torch's thread count on a CPU, 1 on a GPU; 1: one forward on all threads.",
    )
    pooling_batch_wait_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        description="Embed, classify, score: while another forward runs, a worker holds its own for more "
        "inputs as long as each arrives within this many milliseconds of the last (until the forward is "
        "full or the other ends); 0: a free worker starts at once.",
    )
    max_prefill_tokens: int | None = Field(
        None,
        ge=1,
        description="Prompt tokens prefilled in one step (always at least one request); "
        "default: 2048 on a GPU, 8 per running request on a CPU.",
    )
    prefill_chunk_tokens: int | None = Field(
        None,
        ge=0,
        description="A prompt longer than this is prefilled in chunks of this many tokens while other "
        "requests decode, so it pauses their streams for a bounded time per step; default: 2048 on a GPU, "
        "512 on a CPU; 0: never chunk.",
    )
    decode_steps_between_prefills: int | None = Field(
        None,
        ge=0,
        description="Steps that only decode after one that prefilled, while fewer requests wait than "
        "decode (on a CPU it keeps clients with equal lengths from arriving in lockstep during each other's "
        "prefill); default: 1 on a CPU, 0 on a GPU (as vLLM).",
    )
    prepack_weights: bool = Field(
        True,
        description="On a CPU, run an embedding or classification model's float32 linear layers on oneDNN "
        "with their weights reordered once at load (12-35% faster than MKL's sgemm on the bench machine); "
        "the packed copy costs as much memory again as those weights. Generation runs on split linear layers "
        "instead (LLM_SPLIT_LINEAR_LAYERS): on oneDNN its server ran slower.",
    )
    split_linear_layers: bool = Field(
        True,
        description="On a CPU, multiply a generation model's float32 linear layers for inputs of up to 128 "
        "rows (decode steps) in slices of their output features, side by side on all threads (MKL's sgemm "
        "runs such a product on one thread); no extra memory.",
    )
    enable_prefix_caching: bool = Field(
        True,
        description="Keep prompts' full blocks of keys and values and copy them into a later prompt that "
        "starts the same way (same adapter) instead of computing them again (vLLM's automatic prefix "
        "caching); a request asking for prompt_logprobs always computes its whole prompt.",
    )
    block_size: int = Field(
        16, ge=1, le=256, description="Tokens per prefix-cache block (vLLM's --block-size)."
    )
    prefix_cache_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens of keys and values the prefix cache keeps, in a store of its own beside the "
        "batch's cache (allocated at the first prompt stored); least recently used blocks go first when it "
        "is full; default: half of LLM_MAX_BATCH_TOKENS.",
    )
    max_queued_requests: int = Field(256, ge=0, description="Waiting requests beyond which new ones get 429.")
    api_key: SecretStr | None = Field(
        None, description="When set, every non-health endpoint needs it as Bearer."
    )
    request_timeout: float = Field(
        600.0, gt=0, description="Seconds before a generation is ended with an error."
    )
    drain_seconds: float = Field(
        5.0, ge=0, description="After SIGTERM: seconds of 503 readiness before the listener closes."
    )
    shutdown_timeout: float = Field(
        90.0, ge=0, description="After the drain: seconds in-flight requests get."
    )
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="Largest request body accepted (413).")
    enable_runtime_lora: bool = Field(
        False,
        description="Allow /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's), and GET/PUT "
        "/v1/adapters (the set to serve, reconciled in the background, with each adapter's state).",
    )
    log_format: Literal["json", "plain"] = "json"
    log_level: Literal["debug", "info", "warning"] = "info"
    log_prompts: bool = Field(
        False, description="Log prompts and completions (off: they may hold personal data)."
    )
    termination_log: Path = Path("/dev/termination-log")

    @field_validator("adapters", mode="before")
    @classmethod
    def _sources(cls, value: object) -> object:
        if not isinstance(value, dict):
            return value
        if any(not str(name) for name in value):
            raise ValueError("adapter names must not be empty")
        # A plain directory (str or Path) is a source of its own.
        return {
            name: {"source": str(source)} if isinstance(source, (str, Path)) else source
            for name, source in value.items()
        }

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model.name

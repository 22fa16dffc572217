"""`make bench`: the server over HTTP under concurrent streaming clients, against the seed's approach.

What `vllm bench serve` measures (request throughput, output tokens/s, TTFT, TPOT, ITL, end-to-end
latency at p50/p90/p99), for the continuous-batching engine and for the seed's one-`model.generate`-per-
request engine, on the same bench-size model and prompts; plus, offline, one padded `model.generate` over
the 32 prompts (the static-batch bound) and transformers' own continuous batching. Everything is measured
in this one run and reported as ratios. Then the embedding model's part (benchmarks/embeddings_bench.py).
Writes bench/results.json and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from llm_server.demo_model import CORPUS, ModelShape, build_demo_model
from llm_server.engine.split_linear import split_linears
from tools.readiness import wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench"
BENCH_SHAPE = ModelShape(
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=2048,
    max_position_embeddings=1024,
)
PROMPT_TOKENS, OUTPUT_TOKENS = 64, 64
LONG_PROMPTS, LONG_PROMPT_TOKENS = 8, 900  # against the server's default 512-token prefill chunks
SLOW_STEP_S = 0.25
# Each of these runs sends the same prompts in every turn, and the long-prompt run measures a long prefill's
# pauses: a cache hit on the turn before would measure the cache instead. prefix_cache_bench measures it.
NO_PREFIX_CACHING = {"LLM_ENABLE_PREFIX_CACHING": "false"}
SPACED, BACK_TO_BACK = "a decoding step between prefills (1, the CPU default)", "prefills back to back (0)"


@dataclass
class Result:
    engine: str
    scenario: str
    concurrency: int
    requests: int
    duration_s: float
    request_throughput: float
    output_tokens_per_s: float
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(int(q * len(ordered)), len(ordered) - 1)] * 1000, 2)

    return {
        "p50": at(0.5),
        "p90": at(0.9),
        "p99": at(0.99),
        "mean": round(statistics.fmean(ordered) * 1000, 2),
    }


def machine_facts() -> dict[str, Any]:
    """What every benchmark report says of the machine it ran on."""
    import transformers

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }


def ms_per_call(fn: Callable[[], object], reps: int, warm_up: int) -> float:
    """Mean milliseconds of `fn()` over `reps` calls after `warm_up` untimed ones (for the probes)."""
    for _ in range(warm_up):
        fn()
    started = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - started) / reps * 1000


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_prompts(tokenizer: Any, count: int, lengths: list[int], seed: int) -> list[str]:
    """Prompts of the given token lengths, from the demo corpus's words."""
    rng = random.Random(seed)
    words = " ".join(CORPUS).split()
    prompts = []
    for index in range(count):
        target = lengths[index % len(lengths)]
        text = ""
        while len(tokenizer.encode(text)) < target:
            text += rng.choice(words) + " "
        ids = tokenizer.encode(text)[:target]
        prompts.append(tokenizer.decode(ids))
    return prompts


async def event_lines(response: httpx.Response) -> AsyncIterator[str]:
    """SSE lines end at CR, LF or CRLF only; httpx's aiter_lines also splits on U+2028, NEL and others,
    which a model may generate."""
    pending = ""
    async for text in response.aiter_text():
        *lines, pending = re.split(r"\r\n|\r|\n", pending + text)
        for line in lines:
            yield line
    if pending:
        yield pending


async def one_request(
    client: httpx.AsyncClient,
    prompt: str | list[int],
    max_tokens: int,
    model: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One streamed completion; `prompt`: text or token ids; `extra`: fields added to the request, or left
    out where set to None (for a server that rejects a field it does not know)."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        # Sampled, as chat traffic is: greedy decoding of a random-weight model repeats one byte token
        # that never completes a character, so no text (and no first-token event) would stream at all.
        "temperature": 1.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    body = {key: value for key, value in body.items() if value is not None}
    started = time.perf_counter()
    arrivals: list[float] = []
    tokens = 0
    token_ids: list[int] = []  # with vLLM's return_token_ids in `extra`
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in event_lines(response):
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk.get("choices"):
                arrivals.append(time.perf_counter())
                token_ids += chunk["choices"][0].get("token_ids", [])
    done = time.perf_counter()
    ttft = arrivals[0] - started
    return {
        "ttft": ttft,
        "e2e": done - started,
        "tokens": tokens,
        "itl": [b - a for a, b in itertools.pairwise(arrivals)],
        "tpot": (done - started - ttft) / max(tokens - 1, 1),
        "token_ids": token_ids,
    }


Job = tuple[str | list[int], int, str]  # prompt (text or token ids), max_tokens, model


async def drive(
    url: str,
    jobs: list[Job],
    concurrency: int,
    extra: dict[str, Any] | None = None,
    keep_alive: bool = True,
) -> tuple[list[dict[str, Any]], float]:
    """A closed loop: `concurrency` clients, each sending its next request when the last one finished;
    `extra`: fields added to every request; without `keep_alive` each request opens its own connection
    (llama-server closes an idle one after 5 s, and a request sent on it as it closes gets no answer)."""
    pending = list(jobs)
    results: list[dict[str, Any]] = []
    idle_kept = None if keep_alive else 0
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=idle_kept)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def worker() -> None:
            while pending:
                prompt, max_tokens, model = pending.pop()
                results.append(await one_request(client, prompt, max_tokens, model, extra))

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - started


def summarize(
    engine: str, scenario: str, concurrency: int, results: list[dict[str, Any]], duration: float
) -> Result:
    tokens = sum(result["tokens"] for result in results)
    return Result(
        engine,
        scenario,
        concurrency,
        len(results),
        round(duration, 2),
        round(len(results) / duration, 3),
        round(tokens / duration, 1),
        percentiles([r["ttft"] for r in results]),
        percentiles([r["tpot"] for r in results]),
        percentiles([gap for r in results for gap in r["itl"]]),
        percentiles([r["e2e"] for r in results]),
    )


async def streams_beside_long_prompts(
    url: str, stream_jobs: list[tuple[str, int, str]], long_jobs: list[tuple[str, int, str]]
) -> tuple[tuple[list[dict[str, Any]], float], tuple[list[dict[str, Any]], float]]:
    """8 closed-loop streams while one more client sends long prompts one after another."""
    streams, long = await asyncio.gather(drive(url, stream_jobs, 8), drive(url, long_jobs, 1))
    return streams, long


def step_buckets(url: str) -> dict[str, float]:
    """The engine's step-duration histogram from /metrics: cumulative count by upper bound."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name == "llm_engine_step_duration_seconds":
            return {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    raise SystemExit("the server exports no llm_engine_step_duration_seconds")


def long_prompt_run(url: str, label: str, fixed: list[str], long: list[str]) -> dict[str, Any]:
    """How long a long prompt's prefill holds up the running streams: each waits one engine step per token,
    so the steps' durations (the server's histogram) are the pauses, counted in the engine itself (the
    clients' gaps between chunks add the event loop's and their own scheduling on the same two cores)."""
    # The first long prompt grows the cache to its high-water mark (a one-time allocation): not counted.
    warm_streams = [(p, OUTPUT_TOKENS, "bench") for p in fixed[:8]]
    asyncio.run(streams_beside_long_prompts(url, warm_streams, [(long[0], 8, "bench")]))
    before = step_buckets(url)
    stream_jobs = [(fixed[i], OUTPUT_TOKENS, "bench") for i in range(8 * 6)]
    (streams, streams_s), (longs, longs_s) = asyncio.run(
        streams_beside_long_prompts(url, stream_jobs, [(prompt, 8, "bench") for prompt in long])
    )
    after = step_buckets(url)
    steps = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
    longest = min((float(b) for b, n in steps.items() if b != "+Inf" and n == steps["+Inf"]), default=None)
    figures = {
        "steps": int(steps["+Inf"]),
        f"steps_over_{int(SLOW_STEP_S * 1000)}ms": int(steps["+Inf"] - steps[str(SLOW_STEP_S)]),
        "longest_step_at_most_s": longest,
        "streams_tokens_per_s": summarize("batching", "", 8, streams, streams_s).output_tokens_per_s,
        "long_prompt_ttft_p50_ms": summarize("batching", "", 1, longs, longs_s).ttft_ms["p50"],
    }
    print(f"  8 streams beside {LONG_PROMPTS} long prompts, {label}: {figures}", flush=True)
    return figures


def interleaved(
    urls: dict[str, str], jobs: list[tuple[str, int, str]], concurrency: int, order: list[str]
) -> dict[str, tuple[list[dict[str, Any]], float]]:
    """The same closed-loop run against several servers in `order` (A-B-A, A-B-B-A), each server's runs
    pooled."""
    return pooled_turns(order, lambda name: asyncio.run(drive(urls[name], jobs, concurrency)))


def pooled_turns(
    order: list[str], run: Callable[[str], tuple[list[dict[str, Any]], float]]
) -> dict[str, tuple[list[dict[str, Any]], float]]:
    """`run(name)` for each name in `order`, each name's runs pooled: this machine's speed drifts by up to
    ~10% over minutes, and a ratio of runs taken minutes apart would measure the drift too."""
    pooled: dict[str, tuple[list[dict[str, Any]], float]] = {}
    for name in order:
        runs, duration = run(name)
        earlier, spent = pooled.get(name, ([], 0.0))
        pooled[name] = (earlier + runs, spent + duration)
    return pooled


def spacing_runs(urls: dict[str, str], fixed: list[str], mixed: list[str]) -> dict[str, Any]:
    """8 closed-loop streams, equal lengths and then mixed, with a decoding-only step after each prefill
    (default on a CPU) and with prefills back to back, on two fresh servers taking turns (A-B-B-A): first
    tokens (TTFT), the pauses between tokens (ITL) and tokens/s."""
    rng = random.Random(5)
    workloads = {
        "fixed": [(fixed[i], OUTPUT_TOKENS, "bench") for i in range(64)],
        "mixed": [(mixed[i], rng.choice([16, 32, 64, 128]), "bench") for i in range(64)],
    }
    # The cache's one-time growth to these lengths (8 rows of the longest prompts), not measured.
    longest = sorted(workloads["mixed"], key=lambda job: -len(job[0]))[:8]
    for url in urls.values():
        asyncio.run(drive(url, [(prompt, 128, model) for prompt, _, model in longest], 8))
    figures: dict[str, Any] = {name: {} for name in urls}
    for workload, jobs in workloads.items():
        pooled = interleaved(urls, jobs, 8, [SPACED, BACK_TO_BACK, BACK_TO_BACK, SPACED])
        for name, (runs, duration) in pooled.items():
            result = summarize("batching", workload, 8, runs, duration)
            figures[name][workload] = {
                "ttft_p50_ms": result.ttft_ms["p50"],
                "ttft_p99_ms": result.ttft_ms["p99"],
                "itl_p50_ms": result.itl_ms["p50"],
                "itl_p99_ms": result.itl_ms["p99"],
                "output_tokens_per_s": result.output_tokens_per_s,
            }
    for name, figure in figures.items():
        print(f"  8 streams, {name}: {figure}", flush=True)
    return figures


# Every request of a run asks for one of these; the schema's strings and arrays are bounded so that a
# random model under the grammar's mask finishes its JSON within the output tokens (a longer run would
# only reach `length`).
FEATURES: dict[str, dict[str, Any]] = {
    "plain": {},
    "json_schema": {
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "record",
                "schema": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "maxLength": 24},
                        "tags": {
                            "type": "array",
                            "items": {"type": "string", "maxLength": 12},
                            "maxItems": 3,
                        },
                        "score": {"type": "integer", "minimum": 0, "maximum": 100},
                    },
                    "required": ["name", "tags", "score"],
                    "additionalProperties": False,
                },
            },
        }
    },
    "logprobs_5": {"logprobs": 5},
}


def feature_runs(url: str, fixed: list[str], concurrency: int = 32) -> dict[str, Any]:
    """Output tokens/s at `concurrency` streams with every request plain, under a JSON schema, or asking for
    5 log probabilities a token, taking turns (plain, schema, logprobs, logprobs, schema, plain), pooled."""
    jobs = [(fixed[i % len(fixed)], OUTPUT_TOKENS, "bench") for i in range(concurrency * 4)]
    pooled: dict[str, tuple[list[dict[str, Any]], float]] = {}
    for name in ["plain", "json_schema", "logprobs_5", "logprobs_5", "json_schema", "plain"]:
        runs, duration = asyncio.run(drive(url, jobs, concurrency, FEATURES[name]))
        earlier, spent = pooled.get(name, ([], 0.0))
        pooled[name] = (earlier + runs, spent + duration)
    rates = {name: summarize("batching", name, concurrency, *run) for name, run in pooled.items()}
    figures: dict[str, Any] = {
        name: {"output_tokens_per_s": r.output_tokens_per_s, "tpot_p50_ms": r.tpot_ms["p50"]}
        for name, r in rates.items()
    }
    plain = rates["plain"].output_tokens_per_s
    figures["ratios"] = {
        "json_schema_vs_plain": round(rates["json_schema"].output_tokens_per_s / plain, 2),
        "logprobs_5_vs_plain": round(rates["logprobs_5"].output_tokens_per_s / plain, 2),
    }
    figures["targets"] = {"json_schema_vs_plain": 0.8, "logprobs_5_vs_plain": 0.9}
    print(f"  {concurrency} streams with request features: {json.dumps(figures)}", flush=True)
    return figures


class Server:
    def __init__(self, engine: str, model: Path, adapter: Path, **settings: str) -> None:
        self.port = free_port()
        env = {
            **os.environ,
            "LLM_MODEL": str(model),
            "LLM_ADAPTERS": json.dumps({"support": str(adapter)}),
            "LLM_SERVED_MODEL_NAME": "bench",
            "LLM_HOST": "127.0.0.1",
            "LLM_PORT": str(self.port),
            "LLM_DEVICE": "auto",
            "LLM_DTYPE": "auto",
            "LLM_MAX_BATCH_SIZE": "64",
            "LLM_MAX_QUEUED_REQUESTS": "1024",
            "LLM_MAX_MODEL_LEN": "1024",
            **settings,
        }
        self.process = subprocess.Popen([sys.executable, "-m", "benchmarks.serve", engine], env=env, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}"
        if not wait_until_ready(self.url, self.process, timeout=180):
            self.stop()
            raise SystemExit(f"the {engine} server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def model_shape(model_dir: Path) -> dict[str, Any]:
    """The served model's shape as its config.json says (the demo tokenizer's vocabulary can be smaller than
    BENCH_SHAPE asks for, and the model takes the tokenizer's)."""
    config = json.loads((model_dir / "config.json").read_text())
    return {name: config[name] for name in asdict(BENCH_SHAPE) if name in config}


def offline_bounds(model_dir: Path, prompts: list[str], device: torch.device) -> dict[str, Any]:
    """One padded generate over the prompts (the static-batch bound) and transformers' continuous batching."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    if device.type == "cpu":  # the bound moves with the server's kernels: the same split linear layers
        split_linears(model)
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    with torch.inference_mode():
        model.generate(
            **batch, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )  # warm-up
        started = time.perf_counter()
        out = model.generate(
            **batch,
            max_new_tokens=OUTPUT_TOKENS,
            min_new_tokens=OUTPUT_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        static_s = time.perf_counter() - started
    generated = (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)
    bounds: dict[str, Any] = {
        "static_batch_tokens_per_s": round(generated / static_s, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    try:
        cb_model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, attn_implementation="paged|eager"
        )
        cb_model = cb_model.to(device).eval()
        config = GenerationConfig(
            max_new_tokens=OUTPUT_TOKENS,
            min_new_tokens=OUTPUT_TOKENS,
            do_sample=False,
            eos_token_id=-1,
            pad_token_id=tokenizer.pad_token_id,
        )
        inputs = [tokenizer.encode(prompt) for prompt in prompts]
        started = time.perf_counter()
        outputs = cb_model.generate_batch(inputs=inputs, generation_config=config, progress_bar=False)
        cb_s = time.perf_counter() - started
        cb_tokens = sum(len(output.generated_tokens) for output in outputs.values())
        bounds["transformers_cb_tokens_per_s"] = round(cb_tokens / cb_s, 1)
        bounds["transformers_cb_note"] = "includes its start-up (cache allocation, first-step compilation)"
    except Exception as error:  # an older or newer transformers without generate_batch on this device
        bounds["transformers_cb_error"] = f"{type(error).__name__}: {error}"[:300]
    return bounds


def table(results: list[Result]) -> str:
    lines = [
        "| engine | scenario | conc | req/s | out tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | "
        "ITL p50/p90/p99 ms | E2E p50/p90/p99 ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        fmt = lambda m: f"{m['p50']:.0f}/{m['p90']:.0f}/{m['p99']:.0f}"  # noqa: E731
        lines.append(
            f"| {r.engine} | {r.scenario} | {r.concurrency} | {r.request_throughput:.2f} | "
            f"{r.output_tokens_per_s:.0f} | {fmt(r.ttft_ms)} | {fmt(r.tpot_ms)} | {fmt(r.itl_ms)} | "
            f"{fmt(r.e2e_ms)} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument(
        "--requests-per-client",
        type=int,
        default=8,
        help="closed-loop requests per client; many, as vllm bench serve sends many prompts, so that the "
        "first wave (all prompts arriving at once, prefilled together) does not dominate the percentiles",
    )
    parser.add_argument(
        "--skip-seed-above", type=int, default=32, help="the seed engine is slow: skip it beyond"
    )
    args = parser.parse_args()

    WORK.mkdir(exist_ok=True)
    model_dir, adapter_dir = WORK / "model" / "model", WORK / "model" / "adapter"
    if not (model_dir / "config.json").exists():
        build_demo_model(WORK / "model", BENCH_SHAPE)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fixed = make_prompts(tokenizer, 256, [PROMPT_TOKENS], seed=1)
    mixed_lengths = [16, 32, 64, 128, 256]
    mixed = make_prompts(tokenizer, 256, mixed_lengths, seed=2)
    long = make_prompts(tokenizer, LONG_PROMPTS, [LONG_PROMPT_TOKENS], seed=4)
    long_prompts: dict[str, Any] = {}

    results: list[Result] = []
    with contextlib.ExitStack() as running:
        servers = {}
        for engine in ("batching", "seed"):  # each stopped on the way out, whatever fails after it
            servers[engine] = Server(engine, model_dir, adapter_dir, **NO_PREFIX_CACHING)
            running.callback(servers[engine].stop)
        urls = {engine: server.url for engine, server in servers.items()}
        for url in urls.values():
            asyncio.run(drive(url, [(fixed[0], 8, "bench")] * 2, 1))  # warm-up
        for concurrency in args.concurrency:
            count = max(concurrency * args.requests_per_client, 8)
            jobs = [(fixed[i % len(fixed)], OUTPUT_TOKENS, "bench") for i in range(count)]
            with_seed = concurrency <= args.skip_seed_above
            order = ["batching", "seed", "batching"] if with_seed else ["batching"]
            for engine, (runs, duration) in interleaved(urls, jobs, concurrency, order).items():
                results.append(summarize(engine, "fixed", concurrency, runs, duration))
                print(table(results[-1:]).splitlines()[-1], flush=True)
        servers["seed"].stop()
        bounds = offline_bounds(model_dir, fixed[:32], device)  # close in time to the runs it bounds
        url = urls["batching"]
        rng = random.Random(3)
        jobs = [
            (mixed[i], rng.choice([16, 32, 64, 128]), rng.choice(["bench", "support"]))
            for i in range(128)  # 4 per client: the first wave (32 at once) is a quarter of them
        ]
        runs, duration = asyncio.run(drive(url, jobs, 32))
        results.append(summarize("batching", "mixed+adapters", 32, runs, duration))
        print(table(results[-1:]).splitlines()[-1], flush=True)
        long_prompts["chunked"] = long_prompt_run(url, "chunked (default)", fixed, long)
        features = feature_runs(url, fixed)
    with contextlib.ExitStack() as running:
        urls = {}
        for label, steps in ((SPACED, "1"), (BACK_TO_BACK, "0")):  # explicit: a GPU's default is 0
            server = Server(
                "batching",
                model_dir,
                adapter_dir,
                LLM_DECODE_STEPS_BETWEEN_PREFILLS=steps,
                **NO_PREFIX_CACHING,
            )
            running.callback(server.stop)
            urls[label] = server.url
        spacing = spacing_runs(urls, fixed, mixed)
    unchunked = Server("batching", model_dir, adapter_dir, LLM_PREFILL_CHUNK_TOKENS="0", **NO_PREFIX_CACHING)
    try:
        long_prompts["unchunked"] = long_prompt_run(unchunked.url, "unchunked", fixed, long)
    finally:
        unchunked.stop()

    by_key = {(r.engine, r.scenario, r.concurrency): r for r in results}
    ours32 = by_key[("batching", "fixed", 32)].output_tokens_per_s
    seed32 = by_key.get(("seed", "fixed", 32))
    ratios = {
        "vs_seed_at_32": round(ours32 / seed32.output_tokens_per_s, 2) if seed32 else None,
        "vs_static_batch_bound_at_32": round(ours32 / bounds["static_batch_tokens_per_s"], 2),
        "vs_transformers_cb_at_32": round(ours32 / bounds["transformers_cb_tokens_per_s"], 2)
        if "transformers_cb_tokens_per_s" in bounds
        else None,
        "ttft_p50_8_over_1": round(
            by_key[("batching", "fixed", 8)].ttft_ms["p50"] / by_key[("batching", "fixed", 1)].ttft_ms["p50"],
            2,
        ),
    }
    machine = {
        **machine_facts(),
        "model": model_shape(model_dir),
        "parameters": bounds["parameters"],
        "prompt_tokens": PROMPT_TOKENS,
        "output_tokens": OUTPUT_TOKENS,
        "seed_measured_up_to_streams": args.skip_seed_above,
        "command": "make bench (python -m benchmarks.serving_bench " + " ".join(sys.argv[1:]) + ")",
    }
    from benchmarks import embeddings_bench, prefix_cache_bench

    prefix_caching = prefix_cache_bench.measure(model_dir, adapter_dir, bounds["static_batch_tokens_per_s"])
    report = {
        "machine": machine,
        "results": [asdict(r) for r in results],
        "long_prompts": long_prompts,
        "prefill_spacing": spacing,
        "offline": bounds,
        "request_features_at_32": features,
        "ratios": ratios,
        "prefix_caching": prefix_caching,
        "embeddings": embeddings_bench.measure(),  # every generation server has stopped
    }
    (WORK / "results.json").write_text(json.dumps(report, indent=2))
    print("\n" + table(results))
    print("long prompts:", json.dumps(long_prompts))
    print("prefill spacing:", json.dumps(spacing))
    print("\noffline:", json.dumps(bounds))
    print("ratios:", json.dumps(ratios))
    write_markdown(report)
    return 0


def write_markdown(report: dict[str, Any]) -> None:
    results = [Result(**r) for r in report["results"]]
    machine = report["machine"]
    seed_up_to = machine.get("seed_measured_up_to_streams", 32)
    text = f"""# Serving benchmark

Generated by `make bench` ({machine["command"]}); numbers from one run on one machine, compared side by side.

Machine: {machine["platform"]}, {machine["cpus"]} CPUs, device {machine["device"]};
Python {machine["python"]}, torch {machine["torch"]}, transformers {machine["transformers"]}.
Model: Llama-shaped, random weights, {machine["parameters"]} parameters, {machine["model"]}.
Fixed scenario: {machine["prompt_tokens"]}-token prompts, {machine["output_tokens"]} output tokens with EOS
ignored, streamed over HTTP (`/v1/completions`), closed-loop clients. Up to {seed_up_to} streams the two
engines' servers take turns (batching, seed, batching; the batching runs pooled), so the machine's drift
over the minutes the seed takes (up to ~10% here) stays out of the ratio.

{table(results)}

Offline on the same 32 prompts: {json.dumps(report["offline"])}

8 streams beside {LONG_PROMPTS} {LONG_PROMPT_TOKENS}-token prompts, engine steps from the server's
`llm_engine_step_duration_seconds` (each stream waits one step per token), prompts in 512-token chunks
(default) and whole (`LLM_PREFILL_CHUNK_TOKENS=0`): {json.dumps(report["long_prompts"])}

8 streams with a decoding-only step after each prefill (default on a CPU) and with prefills back to back
(`LLM_DECODE_STEPS_BETWEEN_PREFILLS=0`), equal lengths and mixed: {json.dumps(report["prefill_spacing"])}

32 streams of the fixed scenario with every request plain, under a `json_schema` response format, or with
`logprobs: 5` (turns: plain, schema, logprobs, logprobs, schema, plain; pooled):
{json.dumps(report.get("request_features_at_32"))}

Ratios: {json.dumps(report["ratios"])}

Where the time goes, and why a target is missed when one is: `docs/performance.md`.
"""
    if "prefix_caching" in report:
        from benchmarks import prefix_cache_bench

        text += prefix_cache_bench.markdown(report["prefix_caching"])
    if "embeddings" in report:
        from benchmarks import embeddings_bench

        text += embeddings_bench.markdown(report["embeddings"])
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "benchmarks.md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())

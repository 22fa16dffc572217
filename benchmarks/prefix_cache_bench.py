"""Prefix caching, side by side in one run: two servers of the bench model, `LLM_ENABLE_PREFIX_CACHING` on
and off, taking turns (on, off, off, on) on three workloads (issue 17, point 6):

(a) multi-turn chat: 16 concurrent conversations of 6 turns, each turn resending the history as token ids (one
    256-token system prompt, 60-token user turns, 64-token answers): TTFT p50 at turns 4-6;
(b) a shared 1,000-token system prompt in front of 32 concurrent short requests: TTFT p50;
(c) the fixed scenario (64-token prompts, 64 tokens out, 32 streams, no shared prefixes): output tokens/s,
    the cost of looking blocks up and storing them.

Every turn of every workload gets prompts of its own (a fresh seed), so a turn finds nothing the turn before
it left in the cache. The history resends each answer as the model's own token ids (vLLM's
`return_token_ids`), as a chat client resends the answer's text.
`python -m benchmarks.prefix_cache_bench` alone, or as part of `make bench`.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.serving_bench import (
    BENCH_SHAPE,
    OUTPUT_TOKENS,
    PROMPT_TOKENS,
    WORK,
    Server,
    drive,
    make_prompts,
    one_request,
    pooled_turns,
    summarize,
)

ON, OFF = "prefix caching on (default)", "prefix caching off"
TURNS = [ON, OFF, OFF, ON]
CONVERSATIONS, CONVERSATION_TURNS = 16, 6
SYSTEM_TOKENS, USER_TOKENS, ANSWER_TOKENS = 256, 60, 64
SHARED_SYSTEM_TOKENS, SHORT_REQUESTS, QUESTION_TOKENS, SHORT_ANSWER_TOKENS = 1000, 32, 12, 8
TARGETS = {
    "multi_turn_ttft_off_over_on": 3.0,
    "shared_prompt_ttft_off_over_on": 4.0,
    "fixed_tokens_on_over_off": 0.95,
}


def random_ids(rng: random.Random, vocabulary: list[int], count: int) -> list[int]:
    return [rng.choice(vocabulary) for _ in range(count)]


async def conversation(client: httpx.AsyncClient, turns: list[list[int]]) -> list[float]:
    """One client's chat, turn after turn: the whole history each time, each answer as the model's token
    ids. The TTFT of each turn."""
    history: list[int] = []
    ttfts = []
    for user in turns:
        history += user
        result = await one_request(client, list(history), ANSWER_TOKENS, "bench", {"return_token_ids": True})
        ttfts.append(result["ttft"])
        history += result["token_ids"]
    return ttfts


def multi_turn_run(url: str, vocabulary: list[int], seed: int) -> list[list[float]]:
    rng = random.Random(seed)
    system = random_ids(rng, vocabulary, SYSTEM_TOKENS)  # the deployment's, in front of every conversation
    chats = []
    for _ in range(CONVERSATIONS):
        turns = [system + random_ids(rng, vocabulary, USER_TOKENS)]
        turns += [random_ids(rng, vocabulary, USER_TOKENS) for _ in range(CONVERSATION_TURNS - 1)]
        chats.append(turns)

    async def run() -> list[list[float]]:
        limits = httpx.Limits(max_connections=CONVERSATIONS + 4)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            return await asyncio.gather(*(conversation(client, turns) for turns in chats))

    return asyncio.run(run())


def shared_prompt_run(url: str, vocabulary: list[int], seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    system = random_ids(rng, vocabulary, SHARED_SYSTEM_TOKENS)
    jobs = [
        (system + random_ids(rng, vocabulary, QUESTION_TOKENS), SHORT_ANSWER_TOKENS, "bench")
        for _ in range(SHORT_REQUESTS * 2)  # two per client
    ]
    runs, _ = asyncio.run(drive(url, jobs, SHORT_REQUESTS))
    return runs


def p50_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1)


def cache_work_ms_per_request(model_dir: Path, requests: int = 1000) -> float:
    """The engine's prefix-cache work for one request of the fixed scenario, in this process, in steady
    state (every block of the store reused): hash and look up its 64-token prompt, store the prompt's
    blocks, store its prompt and answer at the end. Milliseconds, the mean over `requests`."""
    import torch

    from llm_server.engine.prefix_cache import PrefixCache
    from llm_server.engine.slots import SlotCache

    config = json.loads((model_dir / "config.json").read_text())
    layers, heads = config["num_hidden_layers"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    cache = SlotCache(layers, 64, torch.device("cpu"))
    for layer in cache.layers:
        layer.allocate(
            64, 4 * (PROMPT_TOKENS + OUTPUT_TOKENS), heads, head_dim, torch.float32, torch.device("cpu")
        )
    store = PrefixCache(layers, 65536 // 2 // 16, 16)  # the defaults: half of LLM_MAX_BATCH_TOKENS
    rng = random.Random(7)

    def one() -> float:
        prompt = tuple(rng.randrange(config["vocab_size"]) for _ in range(PROMPT_TOKENS))
        history = prompt + tuple(rng.randrange(config["vocab_size"]) for _ in range(OUTPUT_TOKENS - 1))
        started = time.perf_counter()
        hashes = store.hashes(prompt, "")
        store.cached_prefix(prompt, "", hashes)
        table = store.admit(prompt, "", hashes)
        assert table is not None
        store.store(cache, table, prompt, 3, 10)
        store.store_history(cache, history, "", hashes, 3, 10)
        return time.perf_counter() - started

    for _ in range(3 * store.blocks.num_blocks // 8):  # every block written once: no first-touch page faults
        one()
    return round(sum(one() for _ in range(requests)) / requests * 1000, 3)


def measure(
    model_dir: Path, adapter_dir: Path, static_batch_tokens_per_s: float | None = None
) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    special = set(tokenizer.all_special_ids)
    vocabulary = [token for token in range(len(tokenizer)) if token not in special]
    servers: dict[str, Server] = {}
    try:
        for name, enabled in ((ON, "true"), (OFF, "false")):
            servers[name] = Server("batching", model_dir, adapter_dir, LLM_ENABLE_PREFIX_CACHING=enabled)
        urls = {name: server.url for name, server in servers.items()}
        for url in urls.values():
            asyncio.run(drive(url, [(list(range(1, 40)), 8, "bench")] * 2, 1))  # warm-up
        seeds = iter(range(100, 1000))

        turns: dict[str, list[float]] = {name: [] for name in urls}
        for name in TURNS:
            for ttfts in multi_turn_run(urls[name], vocabulary, next(seeds)):
                turns[name] += ttfts[3:]  # turns 4-6
        multi_turn = {name: {"ttft_p50_ms_turns_4_to_6": p50_ms(values)} for name, values in turns.items()}
        print(f"  multi-turn chat: {json.dumps(multi_turn)}", flush=True)

        shared_ttfts: dict[str, list[float]] = {name: [] for name in urls}
        for name in TURNS:
            shared_ttfts[name] += [
                run["ttft"] for run in shared_prompt_run(urls[name], vocabulary, next(seeds))
            ]
        shared = {name: {"ttft_p50_ms": p50_ms(values)} for name, values in shared_ttfts.items()}
        print(f"  shared {SHARED_SYSTEM_TOKENS}-token system prompt: {json.dumps(shared)}", flush=True)

        def fixed_run(name: str) -> tuple[list[dict[str, Any]], float]:
            prompts = make_prompts(tokenizer, 256, [PROMPT_TOKENS], seed=next(seeds))  # 8 a client
            return asyncio.run(
                drive(urls[name], [(prompt, OUTPUT_TOKENS, "bench") for prompt in prompts], 32)
            )

        fixed = {
            name: {"output_tokens_per_s": summarize("batching", "fixed", 32, *pooled).output_tokens_per_s}
            for name, pooled in pooled_turns(TURNS, fixed_run).items()
        }
        print(f"  fixed scenario at 32 streams: {json.dumps(fixed)}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    ratios = {
        "multi_turn_ttft_off_over_on": round(
            multi_turn[OFF]["ttft_p50_ms_turns_4_to_6"] / multi_turn[ON]["ttft_p50_ms_turns_4_to_6"], 2
        ),
        "shared_prompt_ttft_off_over_on": round(shared[OFF]["ttft_p50_ms"] / shared[ON]["ttft_p50_ms"], 2),
        "fixed_tokens_on_over_off": round(
            fixed[ON]["output_tokens_per_s"] / fixed[OFF]["output_tokens_per_s"], 3
        ),
    }
    # Served requests per second at 32 streams x the cache's milliseconds per request: its share of time.
    work_ms = cache_work_ms_per_request(model_dir)
    requests_per_s = fixed[ON]["output_tokens_per_s"] / OUTPUT_TOKENS
    ratios["cache_work_share_of_time_at_32"] = round(work_ms * requests_per_s / 1000, 4)
    if static_batch_tokens_per_s:
        ratios["fixed_on_vs_static_batch_bound"] = round(
            fixed[ON]["output_tokens_per_s"] / static_batch_tokens_per_s, 2
        )
    report = {
        "multi_turn": multi_turn,
        "shared_system_prompt": shared,
        "fixed_at_32": fixed,
        "cache_work_ms_per_request": work_ms,
        "ratios": ratios,
        "targets": TARGETS,
        "shape": {
            "conversations": CONVERSATIONS,
            "turns": CONVERSATION_TURNS,
            "system_tokens": SYSTEM_TOKENS,
            "user_tokens": USER_TOKENS,
            "answer_tokens": ANSWER_TOKENS,
            "shared_system_tokens": SHARED_SYSTEM_TOKENS,
            "short_requests": SHORT_REQUESTS,
            "question_tokens": QUESTION_TOKENS,
            "short_answer_tokens": SHORT_ANSWER_TOKENS,
        },
    }
    print(f"  prefix caching ratios: {json.dumps(ratios)} (targets {json.dumps(TARGETS)})", flush=True)
    return report


def markdown(report: dict[str, Any]) -> str:
    shape = report["shape"]
    return f"""
## Prefix caching

Two servers, `LLM_ENABLE_PREFIX_CACHING` on and off, taking turns (on, off, off, on; each turn with prompts
of its own), `benchmarks/prefix_cache_bench.py`:

- multi-turn chat, {shape["conversations"]} concurrent conversations of {shape["turns"]} turns resending the
  history ({shape["system_tokens"]}-token system prompt, {shape["user_tokens"]}-token user turns,
  {shape["answer_tokens"]}-token answers), TTFT p50 at turns 4-6: {json.dumps(report["multi_turn"])};
- a shared {shape["shared_system_tokens"]}-token system prompt before {shape["short_requests"]} concurrent
  requests of {shape["question_tokens"]} more tokens, {shape["short_answer_tokens"]} out, TTFT p50:
  {json.dumps(report["shared_system_prompt"])};
- the fixed scenario at 32 streams (no shared prefixes), output tokens/s: {json.dumps(report["fixed_at_32"])};
  the cache's own work per request of it, timed in-process in steady state (hash and look up the
  prompt, store its blocks, store prompt and answer at the end): {report["cache_work_ms_per_request"]} ms,
  which at the requests per second served is `cache_work_share_of_time_at_32` of the time (the on/off
  ratio of two servers moves by more than that between runs on this VM).

Ratios: {json.dumps(report["ratios"])}; targets: {json.dumps(report["targets"])}.
"""


def main() -> int:
    model_dir, adapter_dir = WORK / "model" / "model", WORK / "model" / "adapter"
    if not (model_dir / "config.json").exists():
        from llm_server.demo_model import build_demo_model

        build_demo_model(WORK / "model", BENCH_SHAPE)
    report = measure(model_dir, adapter_dir)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

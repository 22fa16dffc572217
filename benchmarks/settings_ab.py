"""Two servers of `make bench`'s model that differ in their environment, A/B on the fixed scenario:
turns A B B A at each concurrency, each server frozen outside its turns, each one's runs pooled. Prints
output tok/s, TTFT p50, the engine's mean step and the share of the wall time it stepped, and A/B. Not in CI.

    python -m benchmarks.settings_ab - LLM_SPLIT_LINEAR_LAYERS=false [--streams 1,8,32]

An environment of several variables: comma-separated (`A=1,B=2`); `-`: the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import Iterator

import httpx
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.peers_bench import Peer, freeze, thaw, turn, warm_up
from benchmarks.serving_bench import BENCH_SHAPE, PROMPT_TOKENS, WORK, Server, drive, make_prompts, summarize
from llm_server.demo_model import build_demo_model

ORDER = "ABBA"
STEP_METRIC = "llm_engine_step_duration_seconds"


def environment(spec: str) -> dict[str, str]:
    if spec == "-":
        return {}
    return dict(pair.split("=", 1) for pair in spec.split(","))


@contextlib.contextmanager
def environ(extra: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    os.environ.update(extra)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def engine_steps(url: str) -> tuple[float, float]:
    """The engine's step histogram from /metrics: (seconds stepped, steps)."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name == STEP_METRIC:
            totals = {sample.name: sample.value for sample in family.samples}
            return totals[f"{STEP_METRIC}_sum"], totals[f"{STEP_METRIC}_count"]
    raise SystemExit(f"the server exports no {STEP_METRIC}")


def start(spec: str, ids: list[list[int]]) -> Peer:
    model_dir = WORK / "model" / "model"
    with environ(environment(spec)):  # the server process inherits it
        server = Server("batching", model_dir, model_dir.parent / "adapter")
    name = "defaults" if spec == "-" else spec
    return Peer(name, server.process.pid, server.url, [], ids, "bench", {}, server.stop)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("a", help="server A's environment")
    parser.add_argument("b", help="server B's environment")
    parser.add_argument("--streams", default="1,8,32", help="concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=4, help="per turn")
    args = parser.parse_args()
    if not (WORK / "model" / "model" / "config.json").exists():
        build_demo_model(WORK / "model", BENCH_SHAPE)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(WORK / "model" / "model")
    ids = [tokenizer.encode(text) for text in make_prompts(tokenizer, 256, [PROMPT_TOKENS], seed=1)]
    peers: dict[str, Peer] = {}
    try:
        for name, spec in (("A", args.a), ("B", args.b)):
            peers[name] = start(spec, ids)
            warm_up(peers[name])
            freeze(peers[name])
        for streams in (int(level) for level in args.streams.split(",")):
            runs: dict[str, list] = {"A": [], "B": []}
            walls, stepped, steps = (
                dict.fromkeys("AB", 0.0),
                dict.fromkeys("AB", 0.0),
                dict.fromkeys("AB", 0.0),
            )
            for name in ORDER:
                peer = peers[name]
                with turn(peer):
                    before = engine_steps(peer.url)
                    results, wall = asyncio.run(
                        drive(peer.url, peer.jobs(args.requests_per_client * streams), streams)
                    )
                    after = engine_steps(peer.url)
                runs[name] += results
                walls[name] += wall
                stepped[name] += after[0] - before[0]
                steps[name] += after[1] - before[1]
            rates = {}
            for name in "AB":
                result = summarize(name, "fixed", streams, runs[name], walls[name])
                rates[name] = result.output_tokens_per_s
                print(
                    f"{streams} streams, {name} ({peers[name].name}): {result.output_tokens_per_s} tok/s, "
                    f"TTFT p50 {result.ttft_ms['p50']:.0f} ms, "
                    f"mean step {stepped[name] / steps[name] * 1000:.1f} ms, "
                    f"engine stepping {stepped[name] / walls[name]:.2f} of the time",
                    flush=True,
                )
            print(f"{streams} streams: A/B {rates['A'] / rates['B']:.3f}", flush=True)
    finally:
        for peer in peers.values():
            thaw(peer)
            peer.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())

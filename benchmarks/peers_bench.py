"""`make bench-peers` (not run in CI): this server against llama.cpp's llama-server and `transformers serve`.

The fixed scenario of `make bench` (benchmarks/serving_bench.py: 64-token prompts, 64 output tokens with
EOS ignored, streamed `/v1/completions`, temperature 1.0, closed-loop clients) at 1, 8 and 32 streams, on
the same bench model: served by this server, by llama-server (built from the llama.cpp source that PyPI's
llama-cpp-python sdist vendors, cached under ~/.cache/llmservice/llama-cpp; the model converted to an f32
GGUF by llama.cpp's own converter) and by `transformers serve --continuous-batching`. One server works at a
time: the others are frozen (SIGSTOP) outside their turns, and the turns interleave (ours, llama.cpp,
transformers, llama.cpp, ours; each server's runs pooled). Writes bench/peers.json and
docs/benchmarks-peers.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import httpx
import psutil
from safetensors import safe_open

from benchmarks.serving_bench import (
    BENCH_SHAPE,
    OUTPUT_TOKENS,
    PROMPT_TOKENS,
    ROOT,
    WORK,
    Job,
    Result,
    Server,
    drive,
    free_port,
    machine_facts,
    make_prompts,
    model_shape,
    pooled_turns,
    summarize,
    table,
)
from llm_server.demo_model import build_demo_model

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendor/llama.cpp is built: a pinned llama.cpp source
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmservice" / "llama-cpp"
LLAMA_CPP = CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
LLAMA_SERVER = LLAMA_CPP / "build" / "bin" / "llama-server"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DGGML_NATIVE=ON",
]

LOGS = WORK / "model" / "logs"  # the peers' logs (git ignores bench/model/)

OURS, LLAMA, TRANSFORMERS = "ours", "llama.cpp", "transformers serve"
ORDER = [OURS, LLAMA, TRANSFORMERS, LLAMA, OURS]
CONCURRENCY = [1, 8, 32]
SLOTS = 32
SLOT_TOKENS = 2 * (PROMPT_TOKENS + OUTPUT_TOKENS)  # a slot's context with room to spare
# What this server does at temperature 1.0 (top-k, top-p and min-p off); llama.cpp's defaults (top-k 40,
# top-p 0.95, min-p 0.05) would sample from another distribution, with more work a token.
PLAIN_SAMPLING = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}
TARGETS = {  # issue 18: (ratio, comparison, bound)
    "tokens_per_s_vs_llama_cpp_at_1": (">=", 0.7),
    "tokens_per_s_vs_llama_cpp_at_8": None,
    "tokens_per_s_vs_llama_cpp_at_32": (">=", 1.0),
    "ttft_p50_vs_llama_cpp_at_8": ("<=", 0.5),
    "ttft_p50_vs_llama_cpp_at_32": ("<=", 0.5),
    "tokens_per_s_vs_transformers_serve_at_32": (">=", 1.5),
}


def version_of(binary: Path) -> str | None:
    """`binary --version`'s version line, or None when it is missing or does not run."""
    if not binary.is_file():
        return None
    done = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    found = re.search(r"^version: .*$", done.stdout + done.stderr, re.MULTILINE)
    return found.group(0) if done.returncode == 0 and found else None


def build_llama_server() -> Path:
    """llama-server, built once from the pinned sdist's llama.cpp source (minutes on two cores)."""
    if version_of(LLAMA_SERVER):
        return LLAMA_SERVER
    if not (LLAMA_CPP / "CMakeLists.txt").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:"]
        subprocess.run([*pip, f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--dest", str(CACHE)], check=True)
        with tarfile.open(CACHE / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as sdist:
            sdist.extractall(CACHE, filter="data")
    build = LLAMA_CPP / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", LLAMA_CPP, "-B", build, *generator, *CMAKE_FLAGS], check=True)
    jobs = str(os.cpu_count() or 1)
    subprocess.run(["cmake", "--build", build, "--target", "llama-server", "-j", jobs], check=True)
    if not version_of(LLAMA_SERVER):
        raise SystemExit(f"built, but {LLAMA_SERVER} does not run")
    return LLAMA_SERVER


def convert_to_gguf(model_dir: Path) -> Path:
    """The model as an f32 GGUF beside it, by llama.cpp's own converter (the vendored one, with its gguf-py).

    The converter names a BPE tokenizer's pre-tokenizer by a hash of how it splits a test string, and knows
    only published models' hashes; this model's tokenizer is trained on disk. It is GPT-2's byte-level BPE
    (pre_tokenizers.ByteLevel, GPT-2's split pattern), so the conversion says so: "gpt-2", the GPT-2 vocab
    path (Llama's would look for a sentencepiece model first). The prompts are sent as token ids anyway.
    """
    out = model_dir.parent / "model-f32.gguf"
    weights = model_dir / "model.safetensors"
    if out.exists() and out.stat().st_mtime >= weights.stat().st_mtime:
        return out
    argv = ["convert_hf_to_gguf.py", str(model_dir), "--outtype", "f32", "--outfile", str(out)]
    with (
        mock.patch.object(sys, "path", [str(LLAMA_CPP), str(LLAMA_CPP / "gguf-py"), *sys.path]),
        mock.patch.object(sys, "argv", argv),
    ):
        import convert_hf_to_gguf
        from conversion.base import TextModel
        from conversion.llama import LlamaModel

        with (
            mock.patch.object(TextModel, "get_vocab_base_pre", lambda self, tokenizer: "gpt-2"),
            mock.patch.object(LlamaModel, "set_vocab", TextModel._set_vocab_gpt2),
        ):
            convert_hf_to_gguf.main()
    return out


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Until `url`/health answers 200 (llama-server's and transformers serve's readiness)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.5)
    process.terminate()
    process.wait(60)
    tail = log.read_text(errors="replace")[-1500:]
    raise RuntimeError(f"{' '.join(process.args)} not healthy, exit code {process.returncode}: {tail}")


@dataclass
class Peer:
    """A running server and how the scenario's requests are spelled for it."""

    name: str
    pid: int
    url: str
    command: list[str]
    prompts: list[Any]  # token ids, or text where a server takes only text
    model: str
    extra: dict[str, Any]
    stop: Callable[[], None]
    facts: dict[str, Any] = field(default_factory=dict)

    def jobs(self, count: int) -> list[Job]:
        return [(self.prompts[i % len(self.prompts)], OUTPUT_TOKENS, self.model) for i in range(count)]

    def processes(self) -> list[psutil.Process]:
        root = psutil.Process(self.pid)
        return [root, *root.children(recursive=True)]


def start_process(command: list[str], log: Path) -> subprocess.Popen:
    log.parent.mkdir(exist_ok=True)
    with log.open("w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)


def start_ours(model_dir: Path, ids: list[list[int]]) -> Peer:
    server = Server("batching", model_dir, model_dir.parent / "adapter")  # as `make bench` runs it
    return Peer(OURS, server.process.pid, server.url, server.process.args, ids, "bench", {}, server.stop)


def start_llama(binary: Path, gguf: Path, ids: list[list[int]]) -> Peer:
    port, threads = free_port(), str(os.cpu_count())
    command = [str(binary), "-m", str(gguf), "--alias", "bench", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--parallel", str(SLOTS), "-cb", "--ctx-size", str(SLOTS * SLOT_TOKENS)]
    # --cache-ram 0 and cache_prompt false: the runs repeat their prompts, and ours has no prefix cache.
    command += ["--threads", threads, "--threads-batch", threads, "--cache-ram", "0", "--no-webui"]
    process = start_process(command, LOGS / "llama-server.log")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process, LOGS / "llama-server.log", timeout=120)
    extra = {"cache_prompt": False, **PLAIN_SAMPLING}
    return Peer(LLAMA, process.pid, url, command, ids, "bench", extra, lambda: stop_process(process))


def start_transformers(model_dir: Path, texts: list[str], pad_token_id: int) -> Peer:
    port = free_port()
    command = [str(Path(sys.executable).parent / "transformers"), "serve", "--continuous-batching"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--device", "auto", str(model_dir)]
    process = start_process(command, LOGS / "transformers-serve.log")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, process, LOGS / "transformers-serve.log", timeout=180)
    # Its /v1/completions takes a text prompt only and rejects fields OpenAI's schema lacks (ignore_eos):
    # EOS is kept out through the generation config it accepts instead.
    config = {"do_sample": True, "top_k": 0, "top_p": 1.0, "min_new_tokens": OUTPUT_TOKENS}
    config |= {"max_new_tokens": OUTPUT_TOKENS, "eos_token_id": -1, "pad_token_id": pad_token_id}
    extra = {"ignore_eos": None, "stream_options": None, "generation_config": json.dumps(config)}
    return Peer(
        TRANSFORMERS, process.pid, url, command, texts, str(model_dir), extra, lambda: stop_process(process)
    )


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    process.wait(60)


def freeze(peer: Peer) -> None:
    for process in peer.processes():
        process.suspend()


def thaw(peer: Peer) -> None:
    for process in peer.processes():
        process.resume()


@contextlib.contextmanager
def turn(peer: Peer) -> Iterator[None]:
    """The peer runs only inside: frozen outside, so nothing it does while idle takes from another's turn."""
    thaw(peer)
    try:
        yield
    finally:
        freeze(peer)


def idle_cpu(peer: Peer, seconds: float = 5.0) -> float:
    """Share of one core the idle server uses (its whole process tree)."""

    def spent() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in peer.processes())

    before = spent()
    time.sleep(seconds)
    return round((spent() - before) / seconds, 3)


def warm_up(peer: Peer) -> None:
    """Each server's first requests pay one-time costs (allocation, compilation, caches growing to 32 rows):
    run the largest wave once, check every request streamed its 64 tokens, then measure it idle."""
    runs, _ = asyncio.run(drive(peer.url, peer.jobs(2), 1, peer.extra))
    runs += asyncio.run(drive(peer.url, peer.jobs(SLOTS), SLOTS, peer.extra))[0]
    counts = sorted({run["tokens"] for run in runs})
    if counts != [OUTPUT_TOKENS]:
        raise RuntimeError(f"{peer.name} streamed {counts} tokens a request, not {OUTPUT_TOKENS}")
    # usage.completion_tokens is the count; text chunks are the check (fewer where a token ends inside
    # a character and its bytes go out with the next one).
    chunks = [len(run["itl"]) + 1 for run in runs]
    peer.facts["text_chunks_per_request"] = {"min": min(chunks), "max": max(chunks)}
    peer.facts["idle_cpu_cores"] = idle_cpu(peer)
    print(f"{peer.name}: warm; {json.dumps(peer.facts)}", flush=True)


def warmed(start: Callable[[], Peer]) -> Peer:
    peer = start()
    try:
        warm_up(peer)
    except BaseException:
        peer.stop()
        raise
    return peer


def ratios(by_key: dict[tuple[str, int], Result]) -> dict[str, Any]:
    def rate(name: str, concurrency: int) -> float | None:
        result = by_key.get((name, concurrency))
        return result.output_tokens_per_s if result else None

    def ttft(name: str, concurrency: int) -> float | None:
        result = by_key.get((name, concurrency))
        return result.ttft_ms["p50"] if result else None

    pairs = {
        "tokens_per_s_vs_llama_cpp_at_1": (rate(OURS, 1), rate(LLAMA, 1)),
        "tokens_per_s_vs_llama_cpp_at_8": (rate(OURS, 8), rate(LLAMA, 8)),
        "tokens_per_s_vs_llama_cpp_at_32": (rate(OURS, 32), rate(LLAMA, 32)),
        "ttft_p50_vs_llama_cpp_at_8": (ttft(OURS, 8), ttft(LLAMA, 8)),
        "ttft_p50_vs_llama_cpp_at_32": (ttft(OURS, 32), ttft(LLAMA, 32)),
        "tokens_per_s_vs_transformers_serve_at_32": (rate(OURS, 32), rate(TRANSFORMERS, 32)),
    }
    figures: dict[str, Any] = {}
    for name, (ours, theirs) in pairs.items():
        value = round(ours / theirs, 2) if ours and theirs else None
        target = TARGETS[name]
        figures[name] = {"ratio": value}
        if target:
            comparison, bound = target
            met = None if value is None else (value >= bound if comparison == ">=" else value <= bound)
            figures[name] |= {"target": f"{comparison} {bound}", "met": met}
    return figures


def parameters(model_dir: Path) -> int:
    with safe_open(model_dir / "model.safetensors", "pt") as weights:
        return sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())  # noqa: SIM118


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests-per-client", type=int, default=8, help="as `make bench`'s fixed scenario")
    parser.add_argument("--quick", action="store_true", help="one request per client; writes nothing")
    args = parser.parse_args()
    per_client = 1 if args.quick else args.requests_per_client
    started = time.monotonic()

    WORK.mkdir(exist_ok=True)
    model_dir = WORK / "model" / "model"
    if not (model_dir / "config.json").exists():
        build_demo_model(WORK / "model", BENCH_SHAPE)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # `make bench`'s prompts, as token ids: the servers' text tokenizers (llama.cpp's is another
    # implementation) cannot differ then. transformers serve takes text only: the same prompts' text.
    texts = make_prompts(tokenizer, 256, [PROMPT_TOKENS], seed=1)
    ids = [tokenizer.encode(text) for text in texts]
    prompt_lengths = sorted({len(prompt) for prompt in ids})
    binary = build_llama_server()
    gguf = convert_to_gguf(model_dir)

    peers: dict[str, Peer] = {}
    errors: dict[str, str] = {}
    starts: dict[str, Callable[[], Peer]] = {
        OURS: lambda: start_ours(model_dir, ids),
        LLAMA: lambda: start_llama(binary, gguf, ids),
        TRANSFORMERS: lambda: start_transformers(model_dir, texts, tokenizer.pad_token_id),
    }
    results: list[Result] = []
    short: dict[str, int] = {}
    with contextlib.ExitStack() as running:
        for name, start in starts.items():  # one at a time: each warmed up alone, then frozen
            try:
                peer = warmed(start)
            except Exception as error:
                if name != TRANSFORMERS:
                    raise
                errors[name] = f"{type(error).__name__}: {error}"[:2000]
                print(f"{name}: not measured: {errors[name]}", flush=True)
                continue
            running.callback(peer.stop)
            freeze(peer)
            running.callback(thaw, peer)  # callbacks run last first: thawed, then stopped
            peers[name] = peer
        order = [name for name in ORDER if name in peers]
        for concurrency in CONCURRENCY:
            jobs = concurrency * per_client

            def run(name: str, concurrency: int = concurrency, jobs: int = jobs) -> Any:
                peer = peers[name]
                with turn(peer):
                    try:
                        # A connection per request for every server: no keep-alive race (drive's note).
                        return asyncio.run(drive(peer.url, peer.jobs(jobs), concurrency, peer.extra, False))
                    except httpx.HTTPError as error:  # say whose turn failed
                        raise SystemExit(f"{name} at {concurrency} streams: {error!r}") from error

            for name, (runs, duration) in pooled_turns(order, run).items():
                results.append(summarize(name, "fixed", concurrency, runs, duration))
                short[f"{name} at {concurrency}"] = sum(r["tokens"] != OUTPUT_TOKENS for r in runs)
                print(table(results[-1:]).splitlines()[-1], flush=True)

    by_key = {(r.engine, r.concurrency): r for r in results}
    report = {
        "machine": {
            **machine_facts(),
            "llama_cpp": version_of(binary),
            "llama_cpp_source": f"llama-cpp-python=={LLAMA_CPP_PYTHON} sdist, vendor/llama.cpp",
            "model": model_shape(model_dir),
            "parameters": parameters(model_dir),
            "prompt_tokens": prompt_lengths,
            "output_tokens": OUTPUT_TOKENS,
            "requests_per_client": per_client,
            "command": f"make bench-peers ({' '.join(['python -m benchmarks.peers_bench', *sys.argv[1:]])})",
        },
        "servers": {name: {"command": peer.command, **peer.facts} for name, peer in peers.items()},
        "errors": errors,
        "order": order,
        "results": [asdict(r) for r in results],
        "requests_without_64_tokens": short,
        "ratios": ratios(by_key),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print("\n" + table(results))
    print("ratios:", json.dumps(report["ratios"], indent=1))
    print("requests without 64 tokens:", json.dumps(short), "errors:", json.dumps(errors))
    if not args.quick:
        (WORK / "peers.json").write_text(json.dumps(report, indent=2))
        (ROOT / "docs" / "benchmarks-peers.md").write_text(markdown(report))
    return 0


def markdown(report: dict[str, Any]) -> str:
    machine, servers = report["machine"], report["servers"]
    results = [Result(**r) for r in report["results"]]
    commands = "\n".join(f"- {name}: `{' '.join(server['command'])}`" for name, server in servers.items())
    met = {True: "yes", False: "no", None: "not measured"}
    ratio_lines = "\n".join(
        f"| {name} | {figure['ratio']} | {figure.get('target', '-')} | "
        f"{met[figure['met']] if 'met' in figure else '-'} |"
        for name, figure in report["ratios"].items()
    )
    errors = "".join(f"\n{name} was not measured: `{error}`\n" for name, error in report["errors"].items())
    return f"""# Serving benchmark against peers

Generated by `{machine["command"]}` ({report["wall_s"]} s); numbers from one run on one
machine, not run in CI.

Machine: {machine["platform"]}, {machine["cpus"]} CPUs, device {machine["device"]};
Python {machine["python"]}, torch {machine["torch"]}, transformers {machine["transformers"]},
llama.cpp {machine["llama_cpp"]} ({machine["llama_cpp_source"]}).
Model: `make bench`'s, Llama-shaped, random weights, {machine["parameters"]} parameters, {machine["model"]};
for llama.cpp converted to an f32 GGUF by its `convert_hf_to_gguf.py`.

Scenario: `make bench`'s fixed one: {machine["prompt_tokens"]}-token prompts (the same 256, sent as token ids;
as text to transformers serve, whose `/v1/completions` takes text only), {machine["output_tokens"]} output
tokens with EOS ignored (`ignore_eos`; for transformers serve, which rejects that field, a `generation_config`
with `eos_token_id: -1` and `min_new_tokens`), temperature 1.0 with top-k, top-p and min-p off (llama.cpp's
defaults are 40, 0.95 and 0.05), streamed `/v1/completions`,
closed-loop clients, {machine["requests_per_client"]} requests a client. Each server is warmed up first
(its largest wave once) and frozen (SIGSTOP) outside its turns; turns per concurrency: {report["order"]},
each server's runs pooled. Output tokens are the servers' `usage.completion_tokens`; requests without
{machine["output_tokens"]} of them: {report["requests_without_64_tokens"]}. TTFT is the first text chunk's
arrival: this server sends one chunk a token; llama.cpp holds a token back while its text ends inside a
UTF-8 character and transformers serve sends non-empty text only, so their first chunk can come a token
late (the chunk counts below; usually by one inter-token gap, a few per cent of their TTFT here).

Servers (ours with `make bench`'s LLM_* settings, serving_bench.Server):
{commands}
{errors}
{table(results)}

| ours vs peer | ratio | target (issue 18) | met |
|---|---|---|---|
{ratio_lines}

Per server, the text chunks a 64-token request streamed (warm-up) and the CPU it used idle (cores):
{json.dumps({name: {k: v for k, v in s.items() if k != "command"} for name, s in servers.items()})}
"""


if __name__ == "__main__":
    sys.exit(main())

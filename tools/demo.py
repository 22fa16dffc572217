"""`make demo`: the whole path on this machine, no cluster and no hub.

Builds the demo model if missing, renders examples/demo-cpu.yaml with the operator, starts `llm-server
serve` with the settings the rendered ConfigMap gives the pod (model paths mapped to the local demo model),
sends a chat and a streamed chat (to the adapter) with the OpenAI client, prints them, and stops the server.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / ".demo"
EXAMPLE = ROOT / "examples" / "demo-cpu.yaml"
BIN = Path(sys.executable).parent


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    if not (DEMO / "model" / "config.json").exists():
        step("building the demo model (random weights, tokenizer trained here)")
        subprocess.run([BIN / "llm-server", "demo-model", "--out", DEMO], check=True)

    step(f"rendering {EXAMPLE.relative_to(ROOT)} with `llmservice-operator render`")
    rendered = subprocess.run(
        [BIN / "llmservice-operator", "render", "-f", EXAMPLE], check=True, capture_output=True, text=True
    ).stdout
    (DEMO / "rendered.yaml").write_text(rendered)
    documents = list(yaml.safe_load_all(rendered))
    for document in documents:
        print(f"  {document['kind']:<24} {document['metadata']['name']}")
    print(f"  (full manifests: {(DEMO / 'rendered.yaml').relative_to(ROOT)})")
    config = next(doc for doc in documents if doc["kind"] == "ConfigMap")["data"]

    port = free_port()
    env = {
        **os.environ,
        **config,
        "LLM_MODEL": str(DEMO / "model"),
        "LLM_ADAPTERS": f'{{"demo-adapter": "{DEMO / "adapter"}"}}',
        "LLM_HOST": "127.0.0.1",
        "LLM_PORT": str(port),
        "LLM_LOG_FORMAT": "plain",
        "LLM_DRAIN_SECONDS": "0",
    }
    step(f"starting llm-server on port {port} with the ConfigMap's settings")
    server = subprocess.Popen(
        [BIN / "llm-server", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                print(server.stderr.read() if server.stderr else "", file=sys.stderr)
                raise SystemExit("the server did not become ready")
            time.sleep(0.2)

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
    finally:
        step("stopping the server (SIGTERM)")
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        print(f"  exited with {server.returncode}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

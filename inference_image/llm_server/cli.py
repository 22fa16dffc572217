"""`llm-server serve | download | demo-model`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from pydantic import ValidationError

from llm_server.config import ServerSettings
from llm_server.logs import configure_logging


@click.group()
def main() -> None:
    """OpenAI-compatible inference for a base model and its LoRA adapters, or an embedding,
    classification or cross-encoder model."""


def _adapters(values: tuple[str, ...]) -> dict[str, str]:
    adapters = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{value!r}: expected NAME=DIR", param_hint="--adapter")
        if name in adapters:
            raise click.BadParameter(f"adapter {name!r} given twice", param_hint="--adapter")
        adapters[name] = path
    return adapters


@main.command()
@click.option("--model", type=click.Path(path_type=Path), help="Base model directory [LLM_MODEL].")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR", help="A LoRA adapter (repeatable).")
@click.option("--served-model-name", help="Name clients send as `model` [LLM_SERVED_MODEL_NAME].")
@click.option(
    "--task",
    type=click.Choice(["auto", "generate", "embed", "classify", "score"]),
    help="What the model serves [LLM_TASK, auto: detected from the model directory].",
)
@click.option("--host", help="[LLM_HOST, 0.0.0.0]")
@click.option("--port", type=int, help="[LLM_PORT, 8000]")
@click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]))
@click.option("--max-model-len", type=int)
@click.option("--max-new-tokens", type=int)
@click.option("--max-batch-size", type=int)
@click.option("--max-queued-requests", type=int)
@click.option("--request-timeout", type=float)
@click.option("--enable-runtime-lora/--no-enable-runtime-lora", default=None)
def serve(adapters: tuple[str, ...], **options: object) -> None:
    """Serve the model. Every option is also an LLM_* environment variable; options win."""
    overrides = {key: value for key, value in options.items() if value is not None}
    if adapters:
        overrides["adapters"] = _adapters(adapters)
    try:
        settings = ServerSettings(**overrides)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise click.ClickException(f"invalid settings: {problems}") from None
    from llm_server.server import serve as run_server

    sys.exit(run_server(settings))


@main.command()
@click.option("--source", required=True, help="hf://org/repo, file:///path or a mounted absolute path.")
@click.option("--dest", required=True, type=click.Path(path_type=Path), help="Directory to fill.")
@click.option("--revision", default=None, help="Branch, tag or commit (hf:// only).")
def download(source: str, dest: Path, revision: str | None) -> None:
    """Fetch a model or adapter into DEST (resumable); HF_TOKEN authenticates."""
    from llm_server.download import DownloadError
    from llm_server.download import download as fetch
    from llm_server.main import write_termination_message

    configure_logging("json", "info")
    try:
        fetch(source, dest, revision)
    except DownloadError as error:
        write_termination_message(Path("/dev/termination-log"), str(error))
        raise click.ClickException(str(error)) from None


@main.command("demo-model")
@click.option("--out", required=True, type=click.Path(path_type=Path))
def demo_model(out: Path) -> None:
    """Write OUT/model (a tiny Llama-shaped model, random weights) and OUT/adapter (a LoRA for it)."""
    from llm_server.demo_model import build_demo_model

    model_dir, adapter_dir = build_demo_model(out)
    click.echo(json.dumps({"model": str(model_dir), "adapter": str(adapter_dir)}))


if __name__ == "__main__":
    main()

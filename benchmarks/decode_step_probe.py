"""Where a decode step of `make bench`'s model goes on this machine (issue 18), outside the server:
transformers' own forward of one token per row over a StaticCache (64 prompt tokens in a 512-position
cache), eager, eager over the server's split linear layers (engine/split_linear.py, what generation runs
on) or over prepacked ones (engine/prepacked.py, the pooling models'), or under torch.compile
(inductor; `freeze`: inductor's freezing, which prepacks the linear weights for oneDNN; `split-compile`:
the split layers compiled), against the model's
linear layers alone on the same rows (always sgemm). Not in CI; prints ms a step.

    python -m benchmarks.decode_step_probe eager|split|prepack|compile|freeze|split-compile [batches: 1,32]
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, StaticCache

from benchmarks.serving_bench import BENCH_SHAPE, WORK, ms_per_call
from llm_server.demo_model import build_demo_model
from llm_server.engine.prepacked import prepack_linears
from llm_server.engine.split_linear import split_linears


def probe(model: torch.nn.Module, mode: str, batch: int) -> str:
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    cache = StaticCache(config=model.config, max_cache_len=512)
    prompt = torch.randint(4, model.config.vocab_size, (batch, 64))
    with torch.inference_mode():
        pairs = [(torch.randn(batch, m.in_features), m.weight) for m in linears]
        linear_ms = ms_per_call(lambda: [F.linear(x, weight) for x, weight in pairs], 30, warm_up=3)
        logits = model(input_ids=prompt, past_key_values=cache, cache_position=torch.arange(64)).logits
    token, position = logits[:, -1:].argmax(-1), torch.tensor([64])

    def step() -> torch.Tensor:
        return model(input_ids=token, past_key_values=cache, cache_position=position).logits

    run, compile_s = step, 0.0
    if mode in ("compile", "freeze", "split-compile"):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = mode == "freeze"
        run = torch.compile(step, dynamic=False)
        started = time.perf_counter()
        with torch.inference_mode():
            run()
        compile_s = time.perf_counter() - started
    with torch.inference_mode():
        step_ms = ms_per_call(run, 60 if batch == 1 else 30, warm_up=3)
    return (
        f"{mode} batch {batch}: step {step_ms:.2f} ms ({batch * 1000 / step_ms:.0f} tok/s), "
        f"linear layers alone {linear_ms:.2f} ms, compilation {compile_s:.0f} s"
    )


def main() -> int:
    mode = sys.argv[1] if len(sys.argv) > 1 else "eager"
    batches = [int(b) for b in (sys.argv[2] if len(sys.argv) > 2 else "1,32").split(",")]
    model_dir = WORK / "model" / "model"
    if not (model_dir / "config.json").exists():
        build_demo_model(WORK / "model", BENCH_SHAPE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    if mode == "prepack":
        prepack_linears(model)
    if mode in ("split", "split-compile"):
        split_linears(model)
    for batch in batches:
        print(probe(model, mode, batch), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""lm-evaluation-harness against the server as its users run it: `local-completions` at its defaults
(tokenized requests: token ids, echo, logprobs 1, max_tokens 1), batch size 4, over a local multiple-choice
task and a local generate_until task (tests/inference/lm_eval_tasks; the hub is unreachable). Every
per-request loglikelihood equals that of lm-eval's own `hf` backend on the same model directory."""

import os
from pathlib import Path

import pytest

from tests.inference.harness import RunningServer

TASKS = Path(__file__).parent / "lm_eval_tasks"
TASK_NAMES = ["llmservice_mc", "llmservice_gen"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The task files with their data files named by absolute path (datasets resolves them from the cwd)."""
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for task in TASKS.glob("*.yaml"):
        text = task.read_text()
        for data in TASKS.glob("*.jsonl"):
            text = text.replace(f" {data.name}", f" {data}")
        (out / task.name).write_text(text)
    return out


def evaluate(model: str, model_args: dict, task_dir: Path) -> dict:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=TASK_NAMES,
        task_manager=TaskManager(include_path=str(task_dir)),
        batch_size=4,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )


def per_request(results: dict, task: str) -> list:  # type: ignore[type-arg]
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return [response for sample in samples for response in sample["resps"]]


def test_local_completions_equals_the_hf_backend(server: RunningServer, demo, task_dir: Path, figure) -> None:  # type: ignore[no-untyped-def]
    model_dir = str(demo[0])
    served = evaluate(
        "local-completions",
        {
            "base_url": f"{server.url}/v1/completions",
            "model": "tiny",
            "tokenizer": model_dir,
            "tokenizer_backend": "huggingface",
        },
        task_dir,
    )
    alone = evaluate("hf", {"pretrained": model_dir, "dtype": "float32", "device": "cpu"}, task_dir)
    served_ll, alone_ll = per_request(served, "llmservice_mc"), per_request(alone, "llmservice_mc")
    assert len(served_ll) == len(alone_ll) == 24  # 6 questions x 4 choices
    worst = 0.0
    for (ours, ours_greedy), (theirs, theirs_greedy) in zip(
        (response[0] for response in served_ll), (response[0] for response in alone_ll), strict=True
    ):
        worst = max(worst, abs(ours - theirs))
        assert abs(ours - theirs) < 1e-4 and ours_greedy == theirs_greedy
    generated = per_request(served, "llmservice_gen")
    assert len(generated) == 4 and all(isinstance(text[0], str) for text in generated)
    assert generated == per_request(alone, "llmservice_gen")  # greedy, float32: the same text
    for task in TASK_NAMES:
        assert served["results"][task].keys() == alone["results"][task].keys()
    figure(f"lm-eval local-completions vs hf: 24 loglikelihoods within {worst:.1e}, 4 generations equal")

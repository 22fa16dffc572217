"""Structured outputs on the random-weight demo model, the hardest case for a mask: nothing but the mask
keeps its text in shape. Sampling at temperature 1.0 over several seeds, every output must parse and
validate, and must end by itself with finish_reason "stop" (the grammar complete).

Ending is guaranteed, not lucky: every schema bounds its strings (maxLength), arrays (maxItems) and
integers (minimum/maximum), the server's JSON whitespace is bounded (at most 22 bytes between two tokens,
engine/grammar.py), and llguidance allows no \\u escapes, so a character is at most 4 bytes. A token is at
least one byte, so the longest text a grammar allows bounds its tokens; each test's max_tokens is above that
bound, worked out beside it."""

import json
import re
import threading
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import numpy as np
import openai
import pydantic
import pytest
import torch
from transformers import AutoTokenizer

from llm_server.api.errors import APIError
from llm_server.api.schemas import ChatCompletionRequest
from llm_server.api.structured_outputs import grammar_for
from llm_server.engine.grammar import GrammarCompiler
from llm_server.engine.interface import GrammarSpec, SamplingParams
from llm_server.engine.logits_adjust import LogitsState, adjust_rows, blocked, blocked_on
from tests.inference.harness import RunningServer

SEEDS = range(5)
MESSAGES = [{"role": "user", "content": "Describe a customer as JSON."}]
# Compact JSON (the schema's own llguidance options), so that the nested schema's bound stays small: at most
# {"name": 8+34, "age": 7+3, "plan": 8+6, "tags": 9+18+1+18+1, "address": 12, "city": 7+34, "zip": 7+5, }}: 2
# = 180 bytes, so 180 tokens.
CUSTOMER = {
    "x-guidance": {"whitespace_flexible": False},
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "plan": {"enum": ["free", "pro", "team"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "zip": {"type": "integer", "minimum": 10000, "maximum": 99999},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "plan", "tags", "address"],
    "additionalProperties": False,
}
CUSTOMER_TOKENS = 256
CODE = r"[0-9]{3}-[a-z]{2,5}"  # at most 9 tokens
CHOICES = ["alpha", "beta", "gamma delta"]
SUM_LARK = 'start: "(" NUM ("+" NUM)? ")"\nNUM: /[0-9]{1,3}/'  # at most 9 tokens
SUM = r"\([0-9]{1,3}(\+[0-9]{1,3})?\)"


class Pet(pydantic.BaseModel):
    """In the server's default whitespace: 12 gaps of at most 22 bytes, and {"name":"(6 chars)","age":NN,
    "kind":"cat"} at most 57 bytes: 321 tokens."""

    name: str = pydantic.Field(max_length=6)
    age: int = pydantic.Field(ge=0, le=30)
    kind: Literal["cat", "dog"]


PET_TOKENS = 400


@pytest.fixture()
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def chat(server: RunningServer, seed: int | None = None, **fields: Any) -> dict[str, Any]:
    body = {"model": "tiny", "messages": MESSAGES, "temperature": 1.0, "seed": seed, **fields}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def completed(choice: dict[str, Any]) -> str:
    assert choice["finish_reason"] == "stop", choice
    return choice["message"]["content"]


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "customer", "schema": schema, "strict": True}}


@pytest.mark.parametrize("seed", SEEDS)
def test_json_schema_outputs_validate(server: RunningServer, seed: int) -> None:
    choice = chat(server, seed, max_tokens=CUSTOMER_TOKENS, response_format=json_schema(CUSTOMER))
    jsonschema.validate(json.loads(completed(choice)), CUSTOMER)


@pytest.mark.parametrize("seed", SEEDS)
def test_vllm_json_fields_validate(server: RunningServer, seed: int) -> None:
    """structured_outputs.json and guided_json, the schema as an object or as JSON text."""
    for fields in (
        {"structured_outputs": {"json": CUSTOMER}},
        {"guided_json": json.dumps(CUSTOMER)},
    ):
        choice = chat(server, seed, max_tokens=CUSTOMER_TOKENS, **fields)
        jsonschema.validate(json.loads(completed(choice)), CUSTOMER)


@pytest.mark.parametrize("seed", SEEDS)
def test_json_object_is_an_object(server: RunningServer, demo: tuple[Path, Path], seed: int) -> None:
    """Any object has no bound of its own: closers are favoured (logit_bias) so it ends within max_tokens;
    the mask still decides where a closer may go."""
    tokenizer = AutoTokenizer.from_pretrained(demo[0])
    closers = {str(tokenizer.convert_tokens_to_ids(closer)): 100 for closer in ("}", '"')}
    for fields in (
        {"response_format": {"type": "json_object"}},
        {"structured_outputs": {"json_object": True}},
    ):
        choice = chat(server, seed, max_tokens=64, logit_bias=closers, **fields)
        assert isinstance(json.loads(completed(choice)), dict)


@pytest.mark.parametrize("seed", SEEDS)
def test_regex_choice_and_grammar_outputs_match(server: RunningServer, seed: int) -> None:
    for fields, matches in (
        ({"guided_regex": CODE}, lambda text: re.fullmatch(CODE, text)),
        ({"structured_outputs": {"regex": CODE}}, lambda text: re.fullmatch(CODE, text)),
        ({"guided_choice": CHOICES}, lambda text: text in CHOICES),
        ({"structured_outputs": {"choice": CHOICES}}, lambda text: text in CHOICES),
        ({"guided_grammar": SUM_LARK}, lambda text: re.fullmatch(SUM, text)),
        ({"structured_outputs": {"grammar": 'root ::= "yes" | "no"'}}, lambda text: text in ("yes", "no")),
    ):
        text = completed(chat(server, seed, max_tokens=16, **fields))
        assert matches(text), (fields, text)


def test_completions_take_structured_outputs_too(server: RunningServer) -> None:
    """With n choices too: each has a matcher of its own."""
    body = {"model": "tiny", "prompt": "Pick one:", "max_tokens": 16, "n": 4, "guided_choice": CHOICES}
    response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 4
    assert all(choice["finish_reason"] == "stop" and choice["text"] in CHOICES for choice in choices), choices


@pytest.mark.parametrize("seed", SEEDS)
def test_streamed_json_validates(client: openai.OpenAI, seed: int) -> None:
    stream = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=CUSTOMER_TOKENS,
        temperature=1.0,
        seed=seed,
        stream=True,
        response_format=json_schema(CUSTOMER),  # type: ignore[arg-type]
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason == "stop"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    jsonschema.validate(json.loads(text), CUSTOMER)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_sdk_parses_into_a_pydantic_model(client: openai.OpenAI, seed: int) -> None:
    """chat.completions.parse sends the model's strict schema; the server's default whitespace applies."""
    completion = client.chat.completions.parse(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        response_format=Pet,
        max_tokens=PET_TOKENS,
        temperature=1.0,
        seed=seed,
    )
    assert completion.choices[0].finish_reason == "stop"
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.age <= 30


def test_langchain_with_structured_output(server: RunningServer) -> None:
    """LangChain's ChatOpenAI.with_structured_output(method="json_schema"), as a LangChain app calls vLLM."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key="unused",
        model="tiny",
        max_tokens=PET_TOKENS,
        temperature=1.0,
        seed=3,
    )
    pet = llm.with_structured_output(Pet, method="json_schema").invoke("Describe a pet.")
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog")


def test_grammars_and_a_plain_request_share_a_batch(server: RunningServer) -> None:
    """Each row gets its own mask in the batched step; the plain row is what it is alone."""
    plain = {"max_tokens": 24, "temperature": 0, "ignore_eos": True}
    alone = chat(server, **plain)["message"]["content"]
    requests: list[tuple[dict[str, Any], Any]] = [
        (plain, lambda text: text == alone),
        (
            {"max_tokens": CUSTOMER_TOKENS, "response_format": json_schema(CUSTOMER)},
            lambda text: jsonschema.validate(json.loads(text), CUSTOMER) is None,
        ),
        ({"max_tokens": 16, "guided_regex": CODE}, lambda text: re.fullmatch(CODE, text)),
        ({"max_tokens": 16, "guided_choice": CHOICES}, lambda text: text in CHOICES),
        ({"max_tokens": 16, "guided_grammar": SUM_LARK}, lambda text: re.fullmatch(SUM, text)),
    ]
    texts: dict[int, str] = {}
    barrier = threading.Barrier(len(requests))

    def send(index: int, fields: dict[str, Any]) -> None:
        barrier.wait()
        texts[index] = chat(server, seed=index, **fields)["message"]["content"]

    threads = [threading.Thread(target=send, args=(i, fields)) for i, (fields, _) in enumerate(requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for index, (fields, matches) in enumerate(requests):
        assert matches(texts[index]), (fields, texts.get(index))


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"response_format": json_schema({"type": "foo"})}, "response_format", "Invalid type"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_regex": "a(b"}, "guided_regex", "unclosed group"),
        ({"structured_outputs": {"grammar": "start: nothing_here"}}, "structured_outputs.grammar", "unknown"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        (
            {"response_format": {"type": "json_object"}, "guided_regex": "a+"},
            "guided_regex",
            "cannot be combined with response_format",
        ),
        (
            {"structured_outputs": {"regex": "a+", "choice": ["a"]}},
            "structured_outputs.choice",
            "cannot be combined with structured_outputs.regex",
        ),
        (
            {"structured_outputs": {"disable_any_whitespace": True}},
            "structured_outputs.disable_any_whitespace",
            "",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
            "schema",
        ),
        ({"response_format": {"type": "structural_tag"}}, "response_format", "not supported"),
    ],
)
def test_bad_specs_are_400_naming_the_field(
    server: RunningServer, fields: dict[str, Any], param: str, fragment: str
) -> None:
    body = {"model": "tiny", "messages": MESSAGES, "max_tokens": 8, **fields}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


# -- without a server -------------------------------------------------------------------------------------


def test_one_spec_from_each_of_the_three_ways() -> None:
    def spec(**fields: Any) -> GrammarSpec | None:
        return grammar_for(ChatCompletionRequest(model="m", messages=MESSAGES, **fields))  # type: ignore[arg-type]

    schema = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}
    assert spec() is None and spec(response_format={"type": "text"}) is None
    assert spec(structured_outputs={"json_object": False, "regex": None}) is None
    as_json = GrammarSpec("json_schema", json.dumps(schema))  # the properties keep their order
    assert spec(response_format=json_schema(schema)) == as_json
    assert spec(structured_outputs={"json": schema}) == spec(guided_json=json.dumps(schema)) == as_json
    assert spec(response_format={"type": "json_object"}) == GrammarSpec("json_object", "")
    assert spec(guided_choice=["a", "b"]) == GrammarSpec("choice", '["a", "b"]')
    assert spec(guided_regex="a+") == spec(structured_outputs={"regex": "a+"}) == GrammarSpec("regex", "a+")
    assert spec(guided_grammar='root ::= "x"') == GrammarSpec("grammar", 'root ::= "x"')
    with pytest.raises(APIError) as refused:
        spec(guided_json={"type": "object"}, guided_choice=["a"])
    assert refused.value.param == "guided_choice"


@pytest.fixture(scope="module")
def tokenizer(demo: tuple[Path, Path]) -> Any:
    return AutoTokenizer.from_pretrained(demo[0])


def guided_state(tokenizer: Any, spec: GrammarSpec, vocab: int, **params: Any) -> LogitsState:
    end = tokenizer.eos_token_id
    compiler = GrammarCompiler(tokenizer, vocab, {end})
    return LogitsState(
        SamplingParams(16, grammar=spec, **params), [1], {end}, vocab, torch.device("cpu"), compiler
    )


def allowed(row: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(row)).flatten().tolist())


def test_the_end_token_only_where_the_grammar_accepts(tokenizer: Any) -> None:
    vocab, end = len(tokenizer), tokenizer.eos_token_id
    state = guided_state(tokenizer, GrammarSpec("regex", "a{1,2}"), vocab)
    logits = torch.randn(2, vocab)
    a = tokenizer.convert_tokens_to_ids("a")
    first = adjust_rows(logits, [state, None])
    assert end not in allowed(first[0]) and a in allowed(first[0])
    assert torch.equal(first[1], logits[1])  # a row without a grammar is left as it was
    state.observe(a)
    assert end in allowed(adjust_rows(logits, [state, None])[0]) and not state.finished
    state.observe(a)
    assert state.finished  # "aa": nothing may follow, the generation ends without sampling the end token


def test_logits_wider_or_narrower_than_the_tokenizer(tokenizer: Any) -> None:
    """A padded embedding (wider logits: the ids past the tokenizer are never allowed) or a tokenizer with
    ids past the model's logits (they are cut off)."""
    for vocab in (len(tokenizer) + 40, len(tokenizer) - 8):
        state = guided_state(tokenizer, GrammarSpec("json_object", ""), vocab)
        row = adjust_rows(torch.zeros(1, vocab), [state])[0]
        assert row.shape == (vocab,)
        assert allowed(row) == {tokenizer.convert_tokens_to_ids("{")}


def test_a_row_with_nothing_left_gets_the_end_token_not_nan(tokenizer: Any) -> None:
    """min_tokens and stop_token_ids ban the only token the grammar allows: end rather than NaN."""
    vocab, a = len(tokenizer), tokenizer.convert_tokens_to_ids("a")
    state = guided_state(tokenizer, GrammarSpec("regex", "a"), vocab, min_tokens=2, stop_token_ids=(a,))
    row = adjust_rows(torch.randn(1, vocab), [state])[0]
    assert allowed(row) == {tokenizer.eos_token_id}
    assert not torch.isnan(torch.softmax(row, dim=-1)).any()


def test_the_accelerators_unpacking_is_the_hosts() -> None:
    """An accelerator unpacks the bitmask itself (blocked_on, here on the CPU): the same bits as numpy's."""
    words = np.random.default_rng(0).integers(-(2**31), 2**31, size=(3, 5), dtype=np.int64).astype(np.int32)
    assert torch.equal(blocked(words, 150), blocked_on(torch.device("cpu"), words, 150))
    assert blocked(np.array([[0b101]], dtype=np.int32), 3).tolist() == [[False, True, False]]

"""Tool calling: `tools` rendered by the chat template, calls forced by the grammar engine (`required`, a
named function) or read back from the output (`auto`), sent as OpenAI sends them, plain and streamed.

Forced calls run on the random-weight demo model at temperature 1.0, where nothing but the mask keeps the
call in shape. They end by themselves: the forced JSON has a fixed layout (json.dumps's separators, no other
whitespace), and the tools' schemas bound every string (maxLength), integer and enum, so the longest call
{"name": "get_weather", "arguments": {"city": "(8 characters of at most 4 bytes)", "unit": "c"}} is 95
bytes (97 in a list), so at most 97 tokens: CALL_TOKENS is above it."""

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
from transformers import AutoTokenizer

from llm_server.api.errors import APIError
from llm_server.api.schemas import ChatCompletionRequest
from llm_server.api.tools import (
    ParsedCalls,
    ToolCallStream,
    assistant_message,
    chat_grammar,
    parse_tool_calls,
    tool_calling,
)
from tests.inference.harness import RunningServer, running_server

SEEDS = range(5)
CALL_TOKENS = 128
MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ALARM_PARAMETERS = {
    "type": "object",
    "properties": {
        "hour": {"type": "integer", "minimum": 0, "maximum": 23},
        "minute": {"type": "integer", "minimum": 0, "maximum": 59},
    },
    "required": ["hour", "minute"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather now.", "parameters": WEATHER_PARAMETERS},
}
ALARM = {"type": "function", "function": {"name": "set_alarm", "parameters": ALARM_PARAMETERS}}
TOOLS = [WEATHER, ALARM]
PARAMETERS = {"get_weather": WEATHER_PARAMETERS, "set_alarm": ALARM_PARAMETERS}
NAMES = frozenset(PARAMETERS)
NAMED = {"type": "function", "function": {"name": "set_alarm"}}

# A Hermes-style template that renders tools, assistant calls and tool results (the demo's ignores them).
HERMES_TEMPLATE = """{{ bos_token }}
{%- if tools %}<|system|>
<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>{{ eos_token }}
{% endif %}
{%- for message in messages %}<|{{ message.role }}|>
{% if message.tool_calls %}{% for call in message.tool_calls -%}
<tool_call>{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}</tool_call>
{%- endfor %}{% elif message.role == "tool" %}<tool_response>{{ message.content }}</tool_response>
{%- else %}{{ message.content }}{% endif %}{{ eos_token }}
{% endfor %}{% if add_generation_prompt %}<|assistant|>
{% endif %}"""
HISTORY = [
    {"role": "user", "content": "Wake me at seven."},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "set_alarm", "arguments": '{"hour": 7, "minute": 0}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "set"},
]


@pytest.fixture()
def client(server: RunningServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hermes_model(demo: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = tmp_path_factory.mktemp("hermes") / "model"
    shutil.copytree(demo[0], model)
    (model / "chat_template.jinja").write_text(HERMES_TEMPLATE)
    return model


@pytest.fixture(scope="module")
def hermes_server(hermes_model: Path) -> Iterator[RunningServer]:
    with running_server(hermes_model, served_model_name="tiny") as running:
        yield running


def post(server: RunningServer, body: dict[str, Any], path: str = "/v1/chat/completions") -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json={"model": "tiny", **body}, timeout=120)


def chat(server: RunningServer, **fields: Any) -> dict[str, Any]:
    body = {"messages": MESSAGES, "temperature": 1.0, "max_tokens": CALL_TOKENS, **fields}
    response = post(server, body)
    assert response.status_code == 200, response.text
    return response.json()


def streamed(server: RunningServer, **fields: Any) -> list[dict[str, Any]]:
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "temperature": 1.0,
        "max_tokens": CALL_TOKENS,
        "stream": True,
    }
    chunks = []
    with httpx.stream(
        "POST", f"{server.url}/v1/chat/completions", json={**body, **fields}, timeout=120
    ) as sse:
        assert sse.status_code == 200, sse.read()
        for line in sse.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line.removeprefix("data: ")))
    return chunks


def assert_valid_call(call: dict[str, Any], names: frozenset[str] = NAMES) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_"), call
    name = call["function"]["name"]
    assert name in names, call
    jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMETERS[name])


def assert_error(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] and error["param"].split(".")[0] == param, error


# -- forced calls -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_required_and_named_calls_validate(server: RunningServer, seed: int) -> None:
    for tool_choice, names in (("required", NAMES), (NAMED, frozenset({"set_alarm"}))):
        answer = chat(server, seed=seed, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)
        (choice,) = answer["choices"]
        assert choice["finish_reason"] == "tool_calls", choice
        assert choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert_valid_call(call, names)


@pytest.mark.parametrize("seed", SEEDS)
def test_streamed_calls_arrive_whole_with_finish_reason_tool_calls(server: RunningServer, seed: int) -> None:
    """Two choices, each held back and sent as one tool_calls delta of its own (OpenAI's stream shape)."""
    chunks = streamed(server, seed=seed, n=2, tools=TOOLS, tool_choice=NAMED)
    for index in range(2):
        choices = [choice for chunk in chunks for choice in chunk["choices"] if choice["index"] == index]
        assert choices[0]["delta"]["role"] == "assistant"
        assert "".join(choice["delta"].get("content") or "" for choice in choices) == ""
        (last,) = [choice for choice in choices if choice["delta"].get("tool_calls")]
        assert last is choices[-1] and last["finish_reason"] == "tool_calls", last
        (call,) = last["delta"]["tool_calls"]
        assert call["index"] == 0
        assert_valid_call(call, frozenset({"set_alarm"}))


@pytest.mark.parametrize("seed", SEEDS)
def test_required_with_parallel_calls_is_a_list(
    server: RunningServer, demo: tuple[Path, Path], seed: int
) -> None:
    """Parallel calls allowed: a list of calls, ended by favouring `]` (a list has no bound of its own)."""
    closer = AutoTokenizer.from_pretrained(demo[0]).convert_tokens_to_ids("]")
    answer = chat(server, seed=seed, tools=TOOLS, tool_choice="required", logit_bias={str(closer): 100})
    (choice,) = answer["choices"]
    assert choice["finish_reason"] == "tool_calls", choice
    assert choice["message"]["tool_calls"]
    for call in choice["message"]["tool_calls"]:
        assert_valid_call(call)


def test_the_forced_list_takes_several_calls() -> None:
    body = ChatCompletionRequest.model_validate(
        {"messages": MESSAGES, "tools": TOOLS, "tool_choice": "required"}
    )
    calling = tool_calling(body)
    assert calling is not None and calling.grammar is not None and calling.parallel
    schema = json.loads(calling.grammar.value)
    calls = [{"name": "set_alarm", "arguments": {"hour": 7, "minute": 0}}] * 2
    jsonschema.validate(calls, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([{"name": "set_alarm", "arguments": {"city": "Oslo", "unit": "c"}}], schema)


@pytest.mark.parametrize("seed", SEEDS)
def test_the_sdk_reads_the_calls(client: openai.OpenAI, seed: int) -> None:
    completion = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=CALL_TOKENS,
        temperature=1.0,
        seed=seed,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls or []
    assert call.type == "function"
    assert_valid_call(call.model_dump())


class GetWeather(pydantic.BaseModel):
    """The weather in a city now."""

    city: str = pydantic.Field(max_length=8)
    unit: Literal["c", "f"]


@pytest.mark.parametrize("tool_choice", ["GetWeather", "required"])
def test_langchain_bind_tools(server: RunningServer, tool_choice: str) -> None:
    """ChatOpenAI.bind_tools with a pydantic tool, as a LangChain agent calls vLLM: invoked and streamed."""
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        base_url=f"{server.url}/v1",
        api_key="x",
        model="tiny",
        max_tokens=CALL_TOKENS,
        temperature=1.0,
        seed=3,
    )
    bound = llm.bind_tools([GetWeather], tool_choice=tool_choice, strict=True, parallel_tool_calls=False)
    message = bound.invoke("What is the weather in Oslo?")
    chunks = list(bound.stream("What is the weather in Oslo?"))
    streamed_message = chunks[0]
    for chunk in chunks[1:]:
        streamed_message += chunk
    for answer in (message, streamed_message):
        (call,) = answer.tool_calls  # type: ignore[attr-defined]
        assert call["name"] == "GetWeather" and call["id"].startswith("call_")
        GetWeather.model_validate(call["args"])


# -- calls read from the output (auto) --------------------------------------------------------------------

HERMES_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}</tool_call>'
OSLO = ("get_weather", '{"city": "Oslo", "unit": "c"}')
SEVEN = ("set_alarm", '{"hour": 7, "minute": 0}')
PARSED = [
    (HERMES_CALL, ParsedCalls(None, (OSLO,))),
    (f"Let me look.\n{HERMES_CALL}", ParsedCalls("Let me look.", (OSLO,))),
    (
        f'{HERMES_CALL}\n<tool_call>\n{{"name": "set_alarm", "arguments": {{"hour": 7, "minute": 0}}}}\n'
        "</tool_call>",
        ParsedCalls(None, (OSLO, SEVEN)),
    ),
    (HERMES_CALL.removesuffix("</tool_call>"), ParsedCalls(None, (OSLO,))),  # a stop string took the tag
    ('{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}', ParsedCalls(None, (OSLO,))),
    (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}',
        ParsedCalls(None, (OSLO,)),
    ),
    (
        '{"name": "get_weather", "parameters": {"city": "Oslo", "unit": "c"}}; '
        '{"name": "set_alarm", "parameters": {"hour": 7, "minute": 0}}',
        ParsedCalls(None, (OSLO, SEVEN)),
    ),
    (' {"name": "set_alarm", "arguments": {"hour": 7, "minute": 0}}\n', ParsedCalls(None, (SEVEN,))),
    ('{"name": "set_alarm", "arguments": "{\\"hour\\": 7, \\"minute\\": 0}"}', ParsedCalls(None, (SEVEN,))),
    (
        '[{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}, '
        '{"name": "set_alarm", "arguments": {"hour": 7, "minute": 0}}]',
        ParsedCalls(None, (OSLO, SEVEN)),
    ),
]
CONTENT = [
    "It is sunny in Oslo.",
    'Call {"name": "get_weather", "arguments": {}} yourself.',  # JSON calls only open the text
    '{"name": "book_flight", "arguments": {"to": "Oslo"}}',  # not one of the tools
    '<tool_call>{"name": "book_flight", "arguments": {}}</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Os',  # cut at max_tokens
    '{"name": "get_weather"}',  # no arguments
    '{"name": "get_weather", "arguments": [1]}',
    '{"city": "Oslo"}',
    '{"name": "get_weather", "arguments": {}} and more',
    "[1, 2, 3]",
    "[]",
    "[" * 100_000,  # deeper than Python's stack
    "<tool_call>" + "[" * 100_000,
]


@pytest.mark.parametrize(("text", "parsed"), PARSED)
def test_the_common_formats_are_read_as_calls(text: str, parsed: ParsedCalls) -> None:
    assert parse_tool_calls(text, NAMES) == parsed


@pytest.mark.parametrize("text", CONTENT, ids=range(len(CONTENT)))
def test_anything_else_is_content(text: str) -> None:
    assert parse_tool_calls(text, NAMES) is None


def _request(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": MESSAGES, **fields})


def test_auto_reads_calls_and_none_reads_nothing() -> None:
    auto = tool_calling(_request(tools=TOOLS))
    message, finish_reason = assistant_message(HERMES_CALL, "stop", auto)
    assert finish_reason == "tool_calls" and message["content"] is None
    assert [call["function"]["name"] for call in message["tool_calls"]] == ["get_weather"]
    assert tool_calling(_request(tools=TOOLS, tool_choice="none")) is None
    assert tool_calling(_request()) is None and tool_calling(_request(tool_choice="auto")) is None
    assert assistant_message(HERMES_CALL, "stop", None) == (
        {"role": "assistant", "content": HERMES_CALL},
        "stop",
    )
    cut, finish_reason = assistant_message(HERMES_CALL, "length", auto)
    assert cut["tool_calls"] and finish_reason == "length"


def test_without_parallel_calls_only_the_first_counts() -> None:
    single = tool_calling(_request(tools=TOOLS, parallel_tool_calls=False))
    message, _ = assistant_message(PARSED[2][0], "stop", single)
    assert [call["function"]["name"] for call in message["tool_calls"]] == ["get_weather"]


@pytest.mark.parametrize("text", [text for text, _ in PARSED] + CONTENT[:10], ids=range(len(PARSED) + 10))
def test_a_stream_sends_what_the_whole_text_gives(text: str) -> None:
    """Fed a character at a time: the content streamed and the calls at the end are the plain answer's."""
    calling = tool_calling(_request(tools=TOOLS))
    assert calling is not None
    stream = ToolCallStream(calling)
    deltas = [stream.delta(character, None) for character in text[:-1]]
    deltas.append(stream.delta(text[-1], "stop"))
    message, finish_reason = assistant_message(text, "stop", calling)
    assert deltas[-1][1] == finish_reason
    content = "".join(fields.get("content", "") for fields, _ in deltas)
    if "tool_calls" not in message:
        assert content == text
        return
    assert content.strip() == (message["content"] or "")
    sent = deltas[-1][0]["tool_calls"]
    assert [call["index"] for call in sent] == list(range(len(sent)))
    assert [call["function"] for call in sent] == [call["function"] for call in message["tool_calls"]]


def test_content_streams_at_once_up_to_a_call() -> None:
    calling = tool_calling(_request(tools=TOOLS))
    assert calling is not None
    stream = ToolCallStream(calling)
    pieces = ["Let", " me", " look", " <", "tool", "_call>", '{"name"']
    assert [stream.delta(piece, None)[0]["content"] for piece in pieces] == [
        "Let",
        " me",
        " look",
        " ",
        "",
        "",
        "",
    ]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("text", "calls", "content"),
    [
        (f"Let me look. {HERMES_CALL}", [OSLO], "Let me look."),
        ('<|python_tag|>{"name": "set_alarm", "parameters": {"hour": 7, "minute": 0}}', [SEVEN], None),
        ('{"name": "book_flight", "arguments": {}}', [], '{"name": "book_flight", "arguments": {}}'),
    ],
)
def test_auto_reads_what_the_server_generated(
    server: RunningServer, stream: bool, text: str, calls: list[tuple[str, str]], content: str | None
) -> None:
    """The output made to be `text` (guided_choice), as a tool-calling model would write it."""
    fields = {"tools": TOOLS, "guided_choice": [text], "max_tokens": 200}
    if not stream:
        (choice,) = chat(server, **fields)["choices"]
        message, finish_reason = choice["message"], choice["finish_reason"]
    else:
        choices = [chunk["choices"][0] for chunk in streamed(server, **fields) if chunk["choices"]]
        finish_reason = choices[-1]["finish_reason"]
        sent = "".join(choice["delta"].get("content") or "" for choice in choices)
        message = {"content": sent.strip() or None, "tool_calls": choices[-1]["delta"].get("tool_calls")}
    assert finish_reason == ("tool_calls" if calls else "stop")
    assert message["content"] == content
    got = [
        (call["function"]["name"], call["function"]["arguments"]) for call in message.get("tool_calls") or []
    ]
    assert got == calls


# -- rendering ----------------------------------------------------------------------------------------------


def test_history_with_calls_and_results_is_rendered(hermes_server: RunningServer, hermes_model: Path) -> None:
    """The server's prompt is the template's rendering of the tools, the assistant's call (its arguments as
    an object) and the tool's result; /tokenize gives the same ids."""
    tokenizer = AutoTokenizer.from_pretrained(hermes_model)
    arguments = {"hour": 7, "minute": 0}
    call = {"id": "call_1", "type": "function", "function": {"name": "set_alarm", "arguments": arguments}}
    expected = [HISTORY[0], {"role": "assistant", "content": "", "tool_calls": [call]}, HISTORY[2]]
    tools = [ALARM]  # the tiny model's context is 512 tokens, and its tokenizer never saw JSON
    text = tokenizer.apply_chat_template(expected, tools=tools, add_generation_prompt=True, tokenize=False)
    assert '<tool_call>{"name": "set_alarm", "arguments": {"hour": 7, "minute": 0}}</tool_call>' in text
    assert "<tool_response>set</tool_response>" in text and '<tools>{"type": "function"' in text
    ids = tokenizer.apply_chat_template(expected, tools=tools, add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if not isinstance(ids, list) else ids
    as_object = [HISTORY[0], {**HISTORY[1], "tool_calls": [call]}, HISTORY[2]]  # vLLM takes that too
    for history, tool_choice in ((HISTORY, "auto"), (HISTORY, "none"), (as_object, "auto")):
        # "none" still renders the tools, as vLLM does
        answer = chat(hermes_server, messages=history, tools=tools, tool_choice=tool_choice, max_tokens=1)
        assert answer["usage"]["prompt_tokens"] == len(ids)
    tokenized = post(hermes_server, {"messages": HISTORY, "tools": tools}, "/tokenize")
    assert tokenized.status_code == 200, tokenized.text
    assert tokenized.json()["tokens"] == list(ids)
    without_tools = post(hermes_server, {"messages": HISTORY}, "/tokenize").json()["count"]
    assert without_tools < len(ids)


def test_a_template_without_tools_takes_the_history_too(server: RunningServer) -> None:
    answer = chat(server, messages=HISTORY, tools=TOOLS, max_tokens=4, temperature=0)
    assert answer["choices"][0]["finish_reason"] in ("stop", "length")


# -- errors -------------------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": NAMED}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": NAMED, "guided_regex": "[0-9]+"}, "tool_choice"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools"),
    ({"tools": "get_weather"}, "tools"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    (
        {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
            "tool_choice": "required",
        },
        "tools",
    ),
    (
        {"messages": [*HISTORY[:1], {**HISTORY[1], "tool_calls": [{"id": "c", "function": {"name": "f"}}]}]},
        "messages",
    ),
    (
        {
            "messages": [
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{x"}}],
                }
            ]
        },
        "messages",
    ),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": HISTORY[1]["tool_calls"]}]}, "messages"),
]


@pytest.mark.parametrize(("fields", "param"), BAD_REQUESTS, ids=range(len(BAD_REQUESTS)))
def test_bad_tool_requests_are_400_naming_the_field(server: RunningServer, fields: dict, param: str) -> None:
    assert_error(post(server, {"messages": MESSAGES, "max_tokens": 4, **fields}), param)


def test_completions_take_no_tools(server: RunningServer) -> None:
    response = post(server, {"prompt": "Hi", "max_tokens": 4, "tools": TOOLS}, "/v1/completions")
    assert_error(response, "tools")
    assert "not supported" in response.json()["error"]["message"]


def test_a_forced_call_with_a_structured_output_is_refused() -> None:
    body = _request(tools=TOOLS, tool_choice="required", guided_choice=["a"])
    with pytest.raises(APIError) as raised:
        chat_grammar(body, tool_calling(body))
    assert raised.value.param == "tool_choice"
    auto = _request(tools=TOOLS, guided_choice=["a"])  # auto forces nothing: the structured output applies
    grammar = chat_grammar(auto, tool_calling(auto))
    assert grammar is not None and grammar.kind == "choice"

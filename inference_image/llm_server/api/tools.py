"""Tool calling, whatever template renders the tools: what `tools` and `tool_choice` allow, the grammar that
forces a call (`required`, a named function), and the calls read back from the generated text in the JSON
formats of the common templates:

- Hermes and Qwen: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, a block per call, the text
  around the blocks the message's content;
- Llama 3.x: `{"name": ..., "parameters": {...}}`, maybe after `<|python_tag|>`, several separated by `;`;
- plain JSON: `{"name": ..., "arguments": {...}}` or a list of them, which is what a forced call is.

A text is read as calls only when every call in it names one of the request's tools; otherwise it is
content, as it would be without tools."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from collections.abc import Collection
from typing import Any

from llm_server.api.errors import APIError
from llm_server.api.schemas import ChatCompletionRequest, FunctionDefinition, NamedToolChoice, Tool
from llm_server.api.structured_outputs import grammar_for
from llm_server.engine.grammar import grammar_error
from llm_server.engine.interface import GrammarSpec

HERMES_OPEN = "<tool_call>"
PYTHON_TAG = "<|python_tag|>"
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|\Z)", re.DOTALL)
_CALL_SEPARATOR = re.compile(r"\s*;?\s*")  # Llama 3's between calls
_JSON_OPENERS = ("{", "[", PYTHON_TAG)
_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
# Forced calls in json.dumps's layout, as tool-tuned models write theirs; no other whitespace, so a weak
# model cannot wander in it and a call's length is bounded by its schema.
_CALL_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclasses.dataclass(frozen=True)
class ToolCalling:
    """How a request's output is read for calls: those naming `names`, one at most unless `parallel`;
    `grammar` set where tool_choice forces a call (the output is then one in the plain JSON format)."""

    names: frozenset[str]
    parallel: bool
    grammar: GrammarSpec | None


@dataclasses.dataclass(frozen=True)
class ParsedCalls:
    content: str | None  # the text around the calls
    calls: tuple[tuple[str, str], ...]  # (name, arguments as JSON text)


def template_tools(tools: list[Tool] | None) -> list[dict[str, Any]] | None:
    """The tools as chat templates take them (OpenAI's shape, which transformers passes on)."""
    return [tool.model_dump(exclude_none=True) for tool in tools] if tools else None


def tool_calling(body: ChatCompletionRequest) -> ToolCalling | None:
    """The request's tool calling (None: its output is content only); a 400 naming the field for a choice
    its tools cannot meet."""
    tools = body.tools or []
    names = [tool.function.name for tool in tools]
    repeated = next((name for index, name in enumerate(names) if name in names[:index]), None)
    if repeated is not None:
        raise APIError(400, f"tools: two functions are named {repeated!r}", param="tools")
    choice = body.tool_choice or ("auto" if tools else "none")
    if choice == "none":
        return None  # the tools are still rendered, as vLLM does, but nothing is read as a call
    if not tools:
        if choice == "auto":
            return None
        raise APIError(400, "tool_choice needs tools to choose from", param="tool_choice")
    parallel = body.parallel_tool_calls
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            message = f"tool_choice names the function {choice.function.name!r}, which is not in tools"
            raise APIError(400, message, param="tool_choice")
        function = next(tool.function for tool in tools if tool.function.name == choice.function.name)
        return ToolCalling(frozenset([function.name]), False, forced_grammar([function], False))
    grammar = forced_grammar([tool.function for tool in tools], parallel) if choice == "required" else None
    return ToolCalling(frozenset(names), parallel, grammar)


def chat_grammar(body: ChatCompletionRequest, calling: ToolCalling | None) -> GrammarSpec | None:
    """The grammar of a forced call or the request's structured output: one of the two at most."""
    structured = grammar_for(body)
    if calling is None or calling.grammar is None:
        return structured
    if structured is not None:
        message = "tool_choice forces a tool call: it cannot be combined with a structured output"
        raise APIError(400, message, param="tool_choice")
    return calling.grammar


def forced_grammar(functions: list[FunctionDefinition], several: bool) -> GrammarSpec:
    """A call to one of the functions as {"name", "arguments"} (the name first, so that the arguments follow
    its function's schema), or a list of one or more such calls."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": function.name},
                "arguments": function.parameters or _NO_ARGUMENTS,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for function in functions
    ]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema = {"type": "array", "items": call, "minItems": 1} if several else call
    schema = {"x-guidance": _CALL_LAYOUT, **schema}
    spec = GrammarSpec("json_schema", json.dumps(schema))
    error = grammar_error(spec)
    if error is not None:
        raise APIError(
            400, f"tools: a function's parameters are not a usable JSON schema: {error}", param="tools"
        )
    return spec


def parse_tool_calls(text: str, names: Collection[str]) -> ParsedCalls | None:
    """The calls in a generated text and the content around them, or None: the text is content."""
    if HERMES_OPEN in text:
        return _hermes_calls(text, names)
    return _json_calls(text, names)


def _hermes_calls(text: str, names: Collection[str]) -> ParsedCalls | None:
    calls = []
    for block in _HERMES_BLOCK.finditer(text):  # the last may lack its closing tag (a stop string cut it)
        call = _call(_loads(block.group(1)), names)
        if call is None:
            return None
        calls.append(call)
    return ParsedCalls(_HERMES_BLOCK.sub("", text).strip() or None, tuple(calls))


def _json_calls(text: str, names: Collection[str]) -> ParsedCalls | None:
    rest = text.strip().removeprefix(PYTHON_TAG).lstrip()
    if not rest.startswith(("{", "[")):
        return None
    decoder, position, calls = json.JSONDecoder(), 0, []
    while position < len(rest):
        try:
            value, position = decoder.raw_decode(rest, position)
        except (json.JSONDecodeError, RecursionError):
            return None
        for item in value if isinstance(value, list) else [value]:
            call = _call(item, names)
            if call is None:
                return None
            calls.append(call)
        position = _CALL_SEPARATOR.match(rest, position).end()  # type: ignore[union-attr]
    return ParsedCalls(None, tuple(calls)) if calls else None


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):  # a model may nest brackets past Python's stack
        return None


def _call(item: Any, names: Collection[str]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of one call object; "parameters" is Llama 3's key for the arguments,
    which some models write as JSON text."""
    if not isinstance(item, dict):
        return None
    name, arguments = item.get("name"), item.get("arguments", item.get("parameters"))
    if isinstance(arguments, str):
        arguments = _loads(arguments)
    if not (isinstance(name, str) and name in names and isinstance(arguments, dict)):
        return None
    return name, json.dumps(arguments, ensure_ascii=False)


def _read(text: str, calling: ToolCalling) -> ParsedCalls | None:
    parsed = parse_tool_calls(text, calling.names)
    if parsed is not None and not calling.parallel:
        return dataclasses.replace(parsed, calls=parsed.calls[:1])
    return parsed


def _openai_calls(parsed: ParsedCalls, indexed: bool) -> list[dict[str, Any]]:
    """OpenAI's tool_calls entries (a stream's carry their index)."""
    return [
        {
            **({"index": index} if indexed else {}),
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }
        for index, (name, arguments) in enumerate(parsed.calls)
    ]


def _finish_reason(finish_reason: str) -> str:
    return "tool_calls" if finish_reason == "stop" else finish_reason  # a text cut at length stays cut


def assistant_message(
    text: str, finish_reason: str, calling: ToolCalling | None
) -> tuple[dict[str, Any], str]:
    """A whole choice's message and finish reason: its calls, if the text is calls, else the text."""
    parsed = _read(text, calling) if calling is not None else None
    if parsed is None:
        return {"role": "assistant", "content": text}, finish_reason
    message = {"role": "assistant", "content": parsed.content, "tool_calls": _openai_calls(parsed, False)}
    return message, _finish_reason(finish_reason)


class ToolCallStream:
    """One streamed choice's text: what cannot be part of a call goes out at once, the rest is held back to
    the end (a call cannot be told from content before it is complete), then sent as calls or as content.

    Held: a text that opens like a JSON call (after whitespace: `{`, `[`, `<|python_tag|>`), and in any
    other text whatever follows a Hermes `<tool_call>` (or what may become one), as parse_tool_calls reads."""

    def __init__(self, calling: ToolCalling) -> None:
        self._calling = calling
        self._held = ""  # the text not sent yet
        self._opens_as_json: bool | None = None  # None: too little text yet to tell

    def delta(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        """The chunk's delta fields and finish reason for the next piece of text (the last one has the
        finish reason)."""
        self._held += text
        if self._opens_as_json is None:
            self._opens_as_json = _opens_as_json(self._held)
        content = ""
        if self._opens_as_json is False:
            until = _content_until(self._held)
            content, self._held = self._held[:until], self._held[until:]
        if finish_reason is None:
            return {"content": content}, None
        parsed = _read(self._held, self._calling)
        if parsed is None:
            return {"content": content + self._held}, finish_reason
        content += parsed.content or ""
        fields = {**({"content": content} if content else {}), "tool_calls": _openai_calls(parsed, True)}
        return fields, _finish_reason(finish_reason)


def _opens_as_json(text: str) -> bool | None:
    """Whether a choice's first characters open a JSON call, as _json_calls reads one (None: too few)."""
    opening = text.lstrip()
    if opening.startswith(_JSON_OPENERS):
        return True
    if not opening or any(opener.startswith(opening) for opener in _JSON_OPENERS):
        return None
    return False


def _content_until(text: str) -> int:
    """How much of the unsent text is content whatever follows: all but a Hermes `<tool_call>` and what
    follows it, or a tail that may begin one."""
    found = text.find(HERMES_OPEN)
    if found >= 0:
        return found
    partial = next(
        (size for size in range(len(HERMES_OPEN) - 1, 0, -1) if text.endswith(HERMES_OPEN[:size])), 0
    )
    return len(text) - partial

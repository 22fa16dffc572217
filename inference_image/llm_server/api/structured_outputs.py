"""The structured output a request asks for, in any of the three ways clients send one: OpenAI's
`response_format` (json_object, json_schema), vLLM's `structured_outputs` object (json, regex, choice,
grammar, json_object) or vLLM's older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`.

One spec at most, checked by the grammar engine here: a bad schema, regex or grammar is a 400 naming its
field, not a generation that fails after admission."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from llm_server.api.errors import APIError
from llm_server.api.schemas import OpenAIFields
from llm_server.engine.grammar import grammar_error
from llm_server.engine.interface import GrammarSpec

_GUIDED = (  # vLLM's older fields, in the order its StructuredOutputsParams lists their kinds
    ("guided_json", "json_schema"),
    ("guided_regex", "regex"),
    ("guided_choice", "choice"),
    ("guided_grammar", "grammar"),
)
_STRUCTURED_OUTPUTS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
_ASKS_NOTHING = (None, False)


def grammar_for(body: OpenAIFields) -> GrammarSpec | None:
    """The request's one structured output, or None; a 400 naming the field otherwise."""
    asked = list(_asked(body))
    if not asked:
        return None
    if len(asked) > 1:
        (first, _), (second, _) = asked[:2]
        message = f"{second} cannot be combined with {first}: ask for one structured output"
        raise APIError(400, message, param=second)
    field, spec = asked[0]
    error = grammar_error(spec)
    if error is not None:
        raise APIError(400, f"{field} is not a valid {spec.kind.replace('_', ' ')}: {error}", param=field)
    return spec


def _asked(body: OpenAIFields) -> Iterator[tuple[str, GrammarSpec]]:
    """(field, spec) for each way the request asks, in a fixed order (the second one is the 400's)."""
    response_format = body.response_format or {}  # its shape is checked by the schema
    if response_format.get("type") == "json_object":
        yield "response_format", GrammarSpec("json_object", "")
    elif response_format.get("type") == "json_schema":
        schema = response_format["json_schema"]["schema"]
        yield "response_format", _spec("json_schema", schema, "response_format")
    for key, value in (body.structured_outputs or {}).items():
        field = f"structured_outputs.{key}"
        if value in _ASKS_NOTHING:
            continue
        if key == "json_object":
            if value is not True:
                raise APIError(400, f"{field} must be a boolean", param=field)
            yield field, GrammarSpec("json_object", "")
        elif key in _STRUCTURED_OUTPUTS:
            yield field, _spec(_STRUCTURED_OUTPUTS[key], value, field)
        else:  # vLLM's whitespace and backend options, structural tags
            raise APIError(400, f"{field} is not supported by this server", param=field)
    for field, kind in _GUIDED:
        value = getattr(body, field)
        if value is not None:
            yield field, _spec(kind, value, field)


def _spec(kind: str, value: Any, field: str) -> GrammarSpec:
    """The spec of one field's value (a schema as an object or as JSON text, a string, a list of strings)."""
    if kind == "json_schema":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise APIError(400, f"{field} is not valid JSON: {error}", param=field) from None
        if not isinstance(value, dict):
            raise APIError(400, f"{field} must be a JSON schema object", param=field)
        return GrammarSpec("json_schema", json.dumps(value))  # key order kept: it orders the properties
    if kind == "choice":
        if not (isinstance(value, list) and value and all(isinstance(choice, str) for choice in value)):
            raise APIError(400, f"{field} must be a non-empty list of strings", param=field)
        return GrammarSpec("choice", json.dumps(value))
    if not (isinstance(value, str) and value):
        raise APIError(400, f"{field} must be a non-empty string", param=field)
    return GrammarSpec(kind, value)  # type: ignore[arg-type]

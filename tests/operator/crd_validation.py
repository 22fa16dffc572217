"""Validate an LLMService the way the API server would: structural defaults, the OpenAPI schema, CEL rules.

jsonschema checks the openAPIV3Schema (it ignores the x-kubernetes-* extensions); cel-python evaluates
each x-kubernetes-validations rule (and its messageExpression) with `self` bound to the node it sits on,
after defaulting, as the API server does; and lists typed map or set must not repeat a key or a value,
which the API server reports as "Duplicate value".
"""

import copy
import json
from typing import Any

import celpy
import jsonschema

_cel = celpy.Environment()


def _version_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(sub, value[key])
    elif isinstance(value, list) and "items" in schema:
        return [apply_defaults(schema["items"], item) for item in value]
    return value


def _evaluate(expression: str, value: Any) -> Any:
    return _cel.program(_cel.compile(expression)).evaluate({"self": celpy.json_to_cel(value)})


def _cel_violations(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    problems = []
    for rule in schema.get("x-kubernetes-validations") or []:
        if not _evaluate(rule["rule"], value):
            message = _evaluate(rule["messageExpression"], value) if "messageExpression" in rule else None
            problems.append(f"{path}: {message or rule['message']}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value and key != "metadata":
                problems += _cel_violations(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problems += _cel_violations(schema["items"], item, f"{path}[{index}]")
    return problems


def _list_type_violations(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    problems = []
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                problems += _list_type_violations(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list):
        list_type = schema.get("x-kubernetes-list-type")
        seen = []
        for index, item in enumerate(value):
            if list_type in ("map", "set"):
                unique = (
                    {key: item.get(key) for key in schema["x-kubernetes-list-map-keys"]}
                    if list_type == "map"
                    else item
                )
                if unique in seen:
                    as_json = json.dumps(unique, separators=(",", ":"))
                    problems.append(f"{path}[{index}]: Duplicate value: {as_json}")
                seen.append(unique)
            if "items" in schema:
                problems += _list_type_violations(schema["items"], item, f"{path}[{index}]")
    return problems


def crd_violations(crd: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    schema = _version_schema(crd)
    obj = apply_defaults(schema, copy.deepcopy(manifest))
    validator = jsonschema.Draft7Validator(schema)
    problems = [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(obj)
    ]
    if problems:  # the API server stops at schema errors too
        return problems
    return _cel_violations(schema, obj, "self") + _list_type_violations(schema, obj, "self")

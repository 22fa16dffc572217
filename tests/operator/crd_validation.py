"""Validate an LLMService the way the API server would: structural defaults, the OpenAPI schema, CEL rules.

jsonschema checks the openAPIV3Schema (it ignores the x-kubernetes-* extensions); cel-python evaluates
each x-kubernetes-validations rule with `self` bound to the node it sits on, after defaulting, as the API
server does.
"""

import copy
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


def _cel_violations(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    problems = []
    for rule in schema.get("x-kubernetes-validations") or []:
        program = _cel.program(_cel.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            problems.append(f"{path}: {rule['message']}")
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value and key != "metadata":
                problems += _cel_violations(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            problems += _cel_violations(schema["items"], item, f"{path}[{index}]")
    return problems


def _list_map_violations(schema: dict[str, Any], value: Any, path: str) -> list[str]:
    """x-kubernetes-list-type: map means unique keys; jsonschema cannot say that."""
    problems = []
    if isinstance(value, list) and schema.get("x-kubernetes-list-type") == "map":
        keys = [tuple(item.get(key) for key in schema["x-kubernetes-list-map-keys"]) for item in value]
        if len(set(keys)) != len(keys):
            problems.append(
                f"{path}: duplicate entries in a list keyed by {schema['x-kubernetes-list-map-keys']}"
            )
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key in value:
                problems += _list_map_violations(sub, value[key], f"{path}.{key}")
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
    return _cel_violations(schema, obj, "self") + _list_map_violations(schema, obj, "self")

"""Does a live child still match what the operator would apply? Pure, so a no-op pass writes nothing."""

import copy
import hashlib
import json
from typing import Any

from lightkube.utils.quantity import parse_quantity

from llmservice_operator.constants import ANNOTATION_APPLIED_HASH


def applied_hash(manifest: dict[str, Any]) -> str:
    encoded = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()[:16]


def with_applied_hash(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest to send, annotated with the hash of itself.

    A spec edit that removes a field leaves the live object a superset of the new manifest; the hash
    is how such an edit is noticed (server-side apply then removes the field the operator owned).
    """
    stamped = copy.deepcopy(manifest)
    annotations = stamped["metadata"].setdefault("annotations", {})
    annotations[ANNOTATION_APPLIED_HASH] = applied_hash(manifest)
    return stamped


# Pointer booleans keep an explicit false (only a nil pointer is omitted): missing is not false there, and a
# hand-removed protection must be put back.
KEPT_FALSE = frozenset({"allowPrivilegeEscalation", "automountServiceAccountToken", "enableServiceLinks"})


def _is_zero(value: Any) -> bool:
    # The API server drops zero values of omitempty fields, so a desired zero matches a missing key.
    return value is None or value is False or value == 0 or value == "" or value == {} or value == []


def _same_quantity(desired: str, actual: str) -> bool:
    try:
        return parse_quantity(desired) == parse_quantity(actual)
    except (ValueError, ArithmeticError):
        return False


def contains(actual: Any, desired: Any) -> bool:
    """True when every field set in `desired` has the same value in `actual` (which may hold more)."""
    if isinstance(desired, dict):
        if not isinstance(actual, dict):
            return False
        for key, value in desired.items():
            if key not in actual:
                if not _is_zero(value) or (value is False and key in KEPT_FALSE):
                    return False
            elif not contains(actual[key], value):
                return False
        return True
    if isinstance(desired, list):
        if not isinstance(actual, list) or len(actual) != len(desired):
            return False
        return all(contains(item_actual, item) for item_actual, item in zip(actual, desired, strict=True))
    if desired == actual:
        return True
    # Quantities come back canonical ("0.5" is stored as "500m", 1 as "1").
    if isinstance(desired, (str, int)) and isinstance(actual, (str, int)) and not isinstance(desired, bool):
        return _same_quantity(str(desired), str(actual))
    return False


def needs_apply(desired: dict[str, Any], actual: dict[str, Any] | None) -> bool:
    """`desired` carries its applied hash (see with_applied_hash)."""
    if actual is None:
        return True
    wanted_hash = desired["metadata"]["annotations"][ANNOTATION_APPLIED_HASH]
    live_hash = (actual.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_APPLIED_HASH)
    if live_hash != wanted_hash:
        return True
    return not contains(actual, desired)

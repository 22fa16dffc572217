"""Children created by this operator whose first watch event has not reached kopf's index yet.

Without this, a pass that runs between a create and its ADDED event sees the child missing and creates
it again (controller-runtime calls the same idea "expectations"). An entry ends with the first event of
that child, or after a TTL in case the event was lost.
"""

import time
from collections.abc import Callable
from typing import Any

Key = tuple[str, str, str]  # kind, namespace, name


class Expectations:
    def __init__(self, ttl_seconds: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl_seconds
        self._clock = clock
        self._created: dict[Key, tuple[float, dict[str, Any]]] = {}

    def created(self, key: Key, manifest: dict[str, Any]) -> None:
        self._created[key] = (self._clock(), manifest)

    def observed(self, key: Key) -> None:
        self._created.pop(key, None)

    def pending(self, key: Key) -> dict[str, Any] | None:
        """The manifest sent, while its event is still due."""
        entry = self._created.get(key)
        if entry is None:
            return None
        if self._clock() - entry[0] > self._ttl:
            del self._created[key]
            return None
        return entry[1]

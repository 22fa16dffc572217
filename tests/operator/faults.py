"""Faults the emulated API server injects into one client's requests, reproducibly (a seeded RNG).

A `FaultPlan` holds rules; the emulator asks it, for each request, whether to answer with an error
instead of serving it (409 Conflict, 500, 429 with Retry-After), and, for each event of a watch
stream, whether to end the stream there (with a 410 Gone "too old resource version" ERROR event, as
an API server does when its watch cache moved on, or by simply closing it). A faulted request
changes nothing on the server. Every injected fault is counted.

Clients are told apart by their bearer token (harness.py gives the operator "operator-<n>" and the
test client "tests"), so the test's own requests never fail, and a "killed" operator can be cut off:
from the moment of its death nothing it sends reaches the cluster, as with a process that died.

kmock has reactions (`emulator[criteria] << 500`) but its emulator records the write in its object
store before it consults them; a fault must leave the store untouched, so the plan is asked first.
"""

from __future__ import annotations

import collections
import random
import threading
from dataclasses import dataclass

from kmock._internal import rendering

OPERATOR = "operator"  # the prefix of every operator's token
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
REASONS = {
    409: ("Conflict", "Operation cannot be fulfilled: the object has been modified; please retry"),
    429: ("TooManyRequests", "the server has received too many requests and has asked us to try again later"),
    500: ("InternalError", "Internal error occurred: injected fault"),
}
EXPIRED = {
    "apiVersion": "v1",
    "kind": "Status",
    "metadata": {},
    "status": "Failure",
    "message": "too old resource version: 1 (2)",
    "reason": "Expired",
    "code": 410,
}


def client_of(request: rendering.Request) -> str:
    """The bearer token of the request: which client sent it."""
    auth = request.headers.get("Authorization", "")
    return auth.removeprefix("Bearer ").strip()


def agent_of(request: rendering.Request) -> str:
    return "kopf" if request.headers.get("User-Agent", "").startswith("kopf/") else "writer"


@dataclass
class RequestFault:
    """Answer `rate` of the matching requests with `status` (at most `limit` times)."""

    status: int
    rate: float
    methods: frozenset[str] | None = None  # None: every method
    plurals: frozenset[str] | None = None  # None: every resource
    limit: int | None = None
    retry_after: int = 1  # seconds, for 429

    def matches(self, method: str, plural: str) -> bool:
        return (self.methods is None or method in self.methods) and (
            self.plurals is None or plural in self.plurals
        )


@dataclass
class WatchFault:
    """End `rate` of the operator's watch streams at a live event: 410 Gone (expire) or a plain close."""

    rate: float
    expire: bool = True
    limit: int | None = None


def every_fault(watch_limit: int) -> tuple[list[RequestFault], list[WatchFault]]:
    """All fault kinds at once, each at a low rate: what the operator meets on a bad day."""
    return (
        [
            RequestFault(409, rate=0.05, methods=WRITE_METHODS),
            RequestFault(500, rate=0.05),
            RequestFault(429, rate=0.05, retry_after=1),
        ],
        [
            WatchFault(rate=0.02, expire=True, limit=watch_limit),
            WatchFault(rate=0.02, expire=False, limit=watch_limit),
        ],
    )


class FaultPlan:
    def __init__(self, seed: int = 0) -> None:
        self.random = random.Random(seed)
        self.request_faults: list[RequestFault] = []
        self.watch_faults: list[WatchFault] = []
        # (status or "watch-410"/"watch-drop", "kopf" or "writer", method, plural) -> faults injected:
        # "kopf" for kopf's own requests (watches, progress annotations, events: kopf retries them),
        # "writer" for the operator's ChildWriter (children and status: it retries them itself).
        self.injected: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        self._lock = threading.Lock()  # the plan is changed from the test's thread, read in the server's
        self._dead: set[str] = set()
        self._kill_countdown: dict[str, int] = {}
        self.killed = threading.Event()

    # Set-up, from the test's thread.

    def fail_requests(self, fault: RequestFault) -> FaultPlan:
        with self._lock:
            self.request_faults.append(fault)
        return self

    def end_watches(self, fault: WatchFault) -> FaultPlan:
        with self._lock:
            self.watch_faults.append(fault)
        return self

    def inject(self, request_faults: list[RequestFault], watch_faults: list[WatchFault]) -> FaultPlan:
        for fault in request_faults:
            self.fail_requests(fault)
        for watch_fault in watch_faults:
            self.end_watches(watch_fault)
        return self

    def keep_watches(self) -> None:
        with self._lock:
            self.watch_faults.clear()

    def kill_after_writes(self, client: str, writes: int) -> None:
        """Cut `client` off once it has made `writes` more writes (the last one is served)."""
        with self._lock:
            self.killed.clear()
            self._kill_countdown[client] = writes

    def cut_off(self, client: str) -> None:
        with self._lock:
            self._dead.add(client)
            self._kill_countdown.pop(client, None)
        self.killed.set()

    def total(self) -> int:
        return sum(self.injected.values())

    def summary(self) -> dict[str, int]:
        """Faults injected by kind and by whose request got them, e.g. {"500 kopf": 3, "500 writer": 5}."""
        counts: collections.Counter[str] = collections.Counter()
        for (kind, agent, _, _), count in self.injected.items():
            counts[f"{kind} {agent}"] += count
        return dict(sorted(counts.items()))

    # Decisions, from the server's thread.

    def is_dead(self, client: str) -> bool:
        return client in self._dead

    def request_fault(self, client: str, agent: str, method: str, plural: str) -> RequestFault | None:
        """The fault to answer this request with, or None to serve it."""
        if not client.startswith(OPERATOR):
            return None
        with self._lock:
            countdown = self._kill_countdown.get(client)
            if countdown is not None and method in WRITE_METHODS:
                if countdown <= 1:
                    del self._kill_countdown[client]
                    self._dead.add(client)
                    self.killed.set()
                else:
                    self._kill_countdown[client] = countdown - 1
            for fault in self.request_faults:
                if not fault.matches(method, plural):
                    continue
                if fault.limit is not None and fault.limit <= 0:
                    continue
                if self.random.random() < fault.rate:
                    if fault.limit is not None:
                        fault.limit -= 1
                    self.injected[(str(fault.status), agent, method, plural)] += 1
                    return fault
        return None

    def watch_fault(self, client: str, agent: str, plural: str) -> WatchFault | None:
        """Whether to end this watch stream at the event about to be sent."""
        if not client.startswith(OPERATOR):
            return None
        with self._lock:
            for fault in self.watch_faults:
                if fault.limit is not None and fault.limit <= 0:
                    continue
                if self.random.random() < fault.rate:
                    if fault.limit is not None:
                        fault.limit -= 1
                    kind = "watch-410" if fault.expire else "watch-drop"
                    self.injected[(kind, agent, "WATCH", plural)] += 1
                    return fault
        return None

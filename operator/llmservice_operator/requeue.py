"""Passes that failed where kopf will not retry them, run again after a growing delay.

kopf retries its change handlers (create/update/resume) when they raise TemporaryError, but not its
event handlers: a pass started by a child's event that fails (the API server down, throttling, or
conflicting for longer than a request's own retries) would otherwise wait for the next event of that
LLMService, which may never come; a deleted child would stay missing and the status stay ApplyFailed.
This is controller-runtime's rate-limited requeue: one pending retry per LLMService, its delay
doubling up to a cap, reset once a retried pass succeeds.
"""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable

logger = logging.getLogger(__name__)


class Requeue:
    def __init__(self, first_delay: float = 1.0, max_delay: float = 60.0) -> None:
        self._first_delay = first_delay
        self._max_delay = max_delay
        self._pending: dict[Hashable, asyncio.Task[None]] = {}
        self._failures: dict[Hashable, int] = {}

    def retry_later(self, key: Hashable, attempt: Callable[[], Awaitable[bool]]) -> None:
        """Run `attempt` after the backoff of `key`; it returns whether it succeeded (else: again)."""
        if key in self._pending:
            return  # one retry at a time: it runs the whole pass, whatever failed before it
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = min(self._first_delay * 2**failures, self._max_delay)
        self._pending[key] = asyncio.create_task(self._later(key, delay, attempt))

    async def _later(self, key: Hashable, delay: float, attempt: Callable[[], Awaitable[bool]]) -> None:
        await asyncio.sleep(delay)
        del self._pending[key]
        try:
            succeeded = await attempt()
        except Exception:  # a retry must never die silently: log it and try once more later
            logger.exception("retrying a failed pass for %s failed", key)
            succeeded = False
        if succeeded:
            self._failures.pop(key, None)
        else:
            self.retry_later(key, attempt)

    def forget(self, key: Hashable) -> None:
        self._failures.pop(key, None)
        task = self._pending.pop(key, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._pending.values())
        self._pending.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

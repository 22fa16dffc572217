"""kopf.event() from the operator's own background tasks (the adapter sync, the resync).

kopf posts events through a queue it binds, as context variables, only in the tasks that run handlers;
a task the operator starts itself has none, and kopf.event() raises LookupError there. The queue is one
for the whole operator: `capture` notes it from any handler, `bind` gives it to a background task.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from kopf._core.engines import posting  # kopf exposes no public way to post outside a handler


@dataclass
class EventPosting:
    _bound: tuple[asyncio.AbstractEventLoop, Any] | None = field(default=None)

    def capture(self) -> None:
        """Called in a handler: remembers kopf's event queue."""
        if self._bound is None:
            self._bound = (posting.event_queue_loop_var.get(), posting.event_queue_var.get())

    def bind(self) -> bool:
        """Called in a background task before it posts; False until a handler has run."""
        if self._bound is None:
            return False
        loop, queue = self._bound
        posting.event_queue_loop_var.set(loop)
        posting.event_queue_var.set(queue)
        return True

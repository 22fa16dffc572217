"""Stop strings over streamed text: hold back what could still become a stop string."""


class StopMatcher:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(stop for stop in stops if stop)
        self._hold = max((len(stop) for stop in self._stops), default=1) - 1
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text safe to emit now. After a stop string it returns the text before it and sets `stopped`."""
        self._pending += text
        # The earliest match, whichever stop it is: one token can bring in several stops at once.
        found = [index for stop in self._stops if (index := self._pending.find(stop)) >= 0]
        if found:
            self.stopped = True
            emitted, self._pending = self._pending[: min(found)], ""
            return emitted
        if self._hold == 0:
            emitted, self._pending = self._pending, ""
            return emitted
        cut = max(len(self._pending) - self._hold, 0)
        emitted, self._pending = self._pending[:cut], self._pending[cut:]
        return emitted

    def flush(self) -> str:
        emitted, self._pending = self._pending, ""
        return emitted

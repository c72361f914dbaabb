"""A max-priority heap of object keys with lazy invalidation: re-pushing an object supersedes its
older entries, so an update costs O(log n) and no decision ever scans every object."""

import heapq
import itertools


class _Reversed:
    __slots__ = ("key",)

    def __init__(self, key: tuple) -> None:
        self.key = key

    def __lt__(self, other: "_Reversed") -> bool:
        return self.key > other.key


class MaxHeap:
    def __init__(self) -> None:
        self._entries: list = []
        self._version: dict[str, int] = {}
        self._order = itertools.count()

    def __len__(self) -> int:
        return len(self._version)

    def push(self, name: str, key: tuple) -> None:
        version = next(self._order)  # never reused, so an entry discarded earlier cannot come back
        self._version[name] = version
        heapq.heappush(self._entries, (_Reversed(key), version, name, version))
        if len(self._entries) > 4 * len(self._version) + 64:
            self._compact()

    def discard(self, name: str) -> None:
        self._version.pop(name, None)

    def pop(self) -> tuple[str, tuple] | None:
        """Remove and return (name, key) of the largest live entry, or None."""
        while self._entries:
            rev, _, name, version = heapq.heappop(self._entries)
            if self._version.get(name) == version:
                del self._version[name]
                return name, rev.key
        return None

    def peek(self) -> tuple[str, tuple] | None:
        while self._entries:
            rev, _, name, version = self._entries[0]
            if self._version.get(name) == version:
                return name, rev.key
            heapq.heappop(self._entries)
        return None

    def _compact(self) -> None:
        self._entries = [e for e in self._entries if self._version.get(e[2]) == e[3]]
        heapq.heapify(self._entries)

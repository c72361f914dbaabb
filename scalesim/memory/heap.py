"""A min-priority heap of named entries with lazy invalidation: re-pushing a name supersedes its
older entries, so an update costs O(log n) and no decision ever scans every entry. Sort keys are
tuples of numbers compared in C; a max-heap pushes negated keys."""

import heapq
import itertools
from operator import neg

_order = itertools.count()
CLEANED_PER_PUSH = 2


def negated(key: tuple) -> tuple:
    return tuple(map(neg, key))


class LazyHeap:
    __slots__ = ("_entries", "_version")

    def __init__(self) -> None:
        self._entries: list = []
        self._version: dict = {}

    def __len__(self) -> int:
        return len(self._version)

    def __contains__(self, name) -> bool:
        return name in self._version

    def push(self, name, key: tuple) -> None:
        """Enter `name` under `key`, superseding its earlier entry (a no-op if the key is the same)."""
        live = self._version.get(name)
        if live is not None and live[1] == key:
            return
        version = next(_order)  # never reused, so an entry discarded earlier cannot come back
        self._version[name] = (version, key)
        entries = self._entries
        heapq.heappush(entries, (key, version, name))
        for _ in range(CLEANED_PER_PUSH):  # superseded entries on top go now, not at the next decision
            top = entries[0]
            if self._version.get(top[2], (None,))[0] == top[1]:
                break
            heapq.heappop(entries)
        if len(entries) > 4 * len(self._version) + 64:
            self._entries = [e for e in self._entries if self._version.get(e[2], (None,))[0] == e[1]]
            heapq.heapify(self._entries)

    def key_of(self, name) -> tuple | None:
        live = self._version.get(name)
        return None if live is None else live[1]

    def discard(self, name) -> None:
        self._version.pop(name, None)

    def peek(self) -> tuple | None:
        """(name, key) of the smallest live entry, or None."""
        entries = self._entries
        while entries:
            key, version, name = entries[0]
            if self._version.get(name, (None,))[0] == version:
                return name, key
            heapq.heappop(entries)
        return None

    def pop(self) -> tuple | None:
        """Remove and return (name, key) of the smallest live entry, or None."""
        top = self.peek()
        if top is not None:
            heapq.heappop(self._entries)
            del self._version[top[0]]
        return top

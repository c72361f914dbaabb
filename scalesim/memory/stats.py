"""Counters of the memory layer, per tier and kind, published by `llm.memory_stats()`."""

from collections import Counter


class MemoryStats:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.stall_s = 0.0

    def add(self, name: str, kind: str, amount: float = 1, tier: str | None = None) -> None:
        self.counters[f"{name}.{kind}" + (f".{tier}" if tier else "")] += amount
        self.counters[name] += amount

    def snapshot(self) -> dict:
        out = dict(sorted(self.counters.items()))
        out["stall_s"] = round(self.stall_s, 6)
        return out

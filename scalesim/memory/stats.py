"""Counters of the memory layer, per tier and kind, published by `llm.memory_stats()`.

Names are `name`, `name.kind` and `name.kind.tier`. The KV hit counters count prompt tokens at a
request's admission by where their pages were when the request arrived: `hit.kv.device` (on the
device already), `hit.kv.host` / `hit.kv.disk` (loaded for it from there), and `miss.kv` (pages
the agent had computed before but that were recomputed). Weights count requests the same way.
"""

from collections import Counter


class MemoryStats:
    def __init__(self) -> None:
        self.counters: Counter[str] = Counter()
        self.stall_s = 0.0          # wall-clock time with at least one request waiting for a load
        self.stall_request_s = 0.0  # the sum of every request's own wait (overlapping waits add up)

    def add(self, name: str, kind: str, amount: float = 1, tier: str | None = None) -> None:
        self.counters[f"{name}.{kind}" + (f".{tier}" if tier else "")] += amount
        self.counters[name] += amount

    def snapshot(self) -> dict:
        out = dict(sorted(self.counters.items()))
        out["stall_s"] = round(self.stall_s, 6)
        out["stall_request_s"] = round(self.stall_request_s, 6)
        return out

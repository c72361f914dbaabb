"""`/metrics`: Prometheus text from `prometheus_client`, one registry per server.

Counters of requests and tokens are kept here; the engine's queue depth, KV pool and memory
counters are read at scrape time by a collector, so they are never stale.
"""

import re
import threading
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

TOKENS_PER_S_WINDOW_S = 10.0
disable_created_metrics()  # the *_created series only add noise to a scrape
_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_]")


class _EngineCollector(Collector):
    def __init__(self, llm, throughput: "Throughput") -> None:
        self.llm = llm
        self.throughput = throughput

    def collect(self):
        stats = self.llm.stats()
        for name in ("running", "waiting"):
            yield GaugeMetricFamily(f"scalesim_num_requests_{name}", f"sequences {name}", value=stats[name])
        for name in ("kv_blocks_total", "kv_blocks_free", "kv_blocks_cached", "preemptions", "cached_prompt_tokens",
                     "steps", "computed_tokens", "forward_s", "idle_s", "draft_tokens", "accepted_draft_tokens"):
            yield GaugeMetricFamily(f"scalesim_{name}", name.replace("_", " "), value=stats[name])
        yield GaugeMetricFamily("scalesim_generation_tokens_per_second",
                                f"tokens generated per second over the last {TOKENS_PER_S_WINDOW_S:.0f} s",
                                value=self.throughput.tokens_per_s())
        memory = GaugeMetricFamily("scalesim_memory", "memory-layer counters and usage (see memory_stats())",
                                   labels=["name"])
        for name, value in self.llm.memory_stats().items():
            if isinstance(value, (int, float)):
                memory.add_metric([_METRIC_NAME.sub("_", name)], float(value))
        yield memory


class Throughput:
    """Generated tokens in a sliding window, for a tokens/s gauge."""

    def __init__(self) -> None:
        self._events: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add(self, tokens: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._events.append((now, tokens))
            while self._events and self._events[0][0] < now - TOKENS_PER_S_WINDOW_S:
                self._events.popleft()

    def tokens_per_s(self) -> float:
        now = time.monotonic()
        with self._lock:
            return sum(n for t, n in self._events if t >= now - TOKENS_PER_S_WINDOW_S) / TOKENS_PER_S_WINDOW_S


class ServerMetrics:
    def __init__(self, llm) -> None:
        self.registry = CollectorRegistry()
        self.throughput = Throughput()
        self.requests = Counter("scalesim_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("scalesim_prompt_tokens", "prompt tokens received", registry=self.registry)
        self.generation_tokens = Counter("scalesim_generation_tokens", "tokens generated", registry=self.registry)
        self.unknown_hinted_agents = Counter("scalesim_hinted_unknown_agents",
                                             "agents named in hints that the server did not know",
                                             registry=self.registry)
        self.registry.register(_EngineCollector(llm, self.throughput))

    def generated(self, tokens: int) -> None:
        self.generation_tokens.inc(tokens)
        self.throughput.add(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""The engine's side of the memory layer: what requests use, and on-demand loads of their pages.

Implements the scheduler's MemoryHooks over the MemoryManager: eviction by policy, loading a
request's cached prefix back from host or disk before it is matched (counted as stall: it is on
the critical path), and recording which agent uses which pages and weights, with hit/miss and
recomputed-token counters.
"""

import time

from scalesim.engine.block_pool import BlockPool
from scalesim.engine.radix_cache import RadixCache
from scalesim.engine.sequence import Sequence
from scalesim.memory.manager import MemoryManager


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class ManagedMemory:
    def __init__(self, manager: MemoryManager, cache: RadixCache, pool: BlockPool) -> None:
        self.manager = manager
        self.cache = cache
        self.pool = pool
        self.last_tokens: dict[tuple[str, str], list[int]] = {}
        self._counted: set[int] = set()

    def evict(self, num_blocks: int) -> int:
        before = self.pool.num_free
        self.manager.make_device_room(before + num_blocks)
        return self.pool.num_free - before

    def load_prefix(self, seq: Sequence) -> None:
        page, stats = self.pool.block_size, self.manager.stats
        node, rest = self.cache.root(seq.namespace), tuple(seq.token_ids[:-1])
        while len(rest) >= page:
            child = node.children.get(rest[:page])
            if child is None:
                break
            common = self.cache.common_pages(child.tokens, rest)
            if not child.on_device:
                started = time.perf_counter()
                source = child.resident.tier
                if child.resident.loading or not self.manager.promote(child.resident):
                    stats.add("miss", "kv", common * page, tier=source)
                    break
                stats.add("miss", "kv", common * page, tier=source)
                stats.stall_s += time.perf_counter() - started
            else:
                stats.add("hit", "kv", common * page, tier="device")
            if common * page < len(child.tokens):
                break
            node, rest = child, rest[len(child.tokens):]

    def used(self, seq: Sequence) -> None:
        agent = seq.agent_id
        node = seq.cache_node
        while node is not None and not node.is_root:
            if node.resident is not None:
                self.manager.touch(node.resident, agent)
            node = node.parent
        for handle in seq.weights:
            self.manager.touch(handle, agent)
        if agent is not None and id(seq) not in self._counted:
            self._counted.add(id(seq))
            before = self.last_tokens.get((agent, seq.namespace), [])
            recomputed = _common_prefix_len(before, seq.token_ids) - seq.num_cached_tokens
            if recomputed > 0:
                self.manager.stats.add("recomputed_tokens", "kv", recomputed)

    def finished(self, seq: Sequence) -> None:
        self._counted.discard(id(seq))
        if seq.agent_id is not None:
            self.last_tokens[(seq.agent_id, seq.namespace)] = seq.token_ids[: seq.num_computed_tokens]

"""The engine's side of the memory layer: what requests use, and on-demand loads of their state.

Implements the scheduler's MemoryHooks over the MemoryManager: eviction by policy, on-demand
loads of a waiting request's weights and cached prefix from host or disk as one group (the
request waits, the batch runs on; what the group loaded is held until the request is admitted),
and recording which agent uses which pages and weights, with hit/miss and recomputed-token
counters.
"""

from scalesim.engine.block_pool import BlockPool
from scalesim.engine.radix_cache import RadixCache
from scalesim.engine.sequence import Sequence
from scalesim.memory.manager import MemoryManager


MAX_PREFIX_WAITS = 2000  # scheduler checks (about 5 ms apart when idle) before recomputing instead


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
        self._waits: dict[int, int] = {}

    def evict(self, num_blocks: int) -> int:
        before = self.pool.num_free
        self.manager.make_device_room(before + num_blocks)
        return self.pool.num_free - before

    def state_ready(self, seq: Sequence) -> bool:
        """True when the sequence's weights and cached prefix (as far as it goes) are on the device;
        otherwise queue one on-demand load group for what is on host or disk and let the sequence
        wait. After MAX_PREFIX_WAITS checks a prefix still not loaded is recomputed instead, so
        nothing waits forever; weights are always waited for."""
        page, stats = self.pool.block_size, self.manager.stats
        node, rest = self.cache.root(seq.namespace), tuple(seq.token_ids[:-1])
        hit_tokens, pending = 0, []
        while len(rest) >= page:
            child = node.children.get(rest[:page])
            if child is None:
                break
            common = self.cache.common_pages(child.tokens, rest)
            if not child.on_device:
                pending.append(child.resident)
            else:
                hit_tokens += common * page
            if common * page < len(child.tokens):
                break
            node, rest = child, rest[len(child.tokens):]
        waits = self._waits.get(id(seq), 0)
        if waits >= MAX_PREFIX_WAITS:
            pending = []
        weights = [h for h in seq.weights if not h.on_device]
        if pending or weights:
            if waits == 0:
                for obj in pending:
                    stats.add("miss", "kv", obj.nbytes // self.pool.block_nbytes * page, tier=obj.tier)
            self._waits[id(seq)] = waits + 1
            self.manager.request_group(id(seq), weights + pending)
            return False
        self._waits.pop(id(seq), None)
        stats.add("hit", "kv", hit_tokens, tier="device")
        return True

    def used(self, seq: Sequence) -> None:
        self.manager.release_group(id(seq))  # admitted: its state is pinned now
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
            reusable = _common_prefix_len(before, seq.token_ids) // self.pool.block_size * self.pool.block_size
            recomputed = reusable - seq.num_cached_tokens
            if recomputed > 0:
                self.manager.stats.add("recomputed_tokens", "kv", recomputed)

    def finished(self, seq: Sequence) -> None:
        self.manager.release_group(id(seq))
        self._counted.discard(id(seq))
        self._waits.pop(id(seq), None)
        if seq.agent_id is not None:
            self.last_tokens[(seq.agent_id, seq.namespace)] = seq.token_ids[: seq.num_computed_tokens]

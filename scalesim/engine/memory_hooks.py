"""The engine's side of the memory layer: what requests use, and on-demand loads of their state.

Implements the scheduler's MemoryHooks over the MemoryManager: eviction by policy, on-demand
loads of a waiting request's weights and cached prefix from host or disk as one group (the
request waits, the batch runs on; what the group loaded is held until the request is admitted),
the step's stacked LoRA buffers, and which agent uses which pages and weights. Hits are counted
once per request, at admission, by where each page was when the scheduler first looked at the
request: pages loaded for it are host or disk hits (by the tier they came from), the rest of its
cached prefix device hits; pages the agent had computed before but that were recomputed are
misses (see memory/stats.py).
"""

from scalesim.engine.block_pool import BlockPool
from scalesim.engine.radix_cache import RadixCache
from scalesim.engine.sequence import Sequence
from scalesim.memory.manager import MemoryManager

MAX_PREFIX_WAITS = 2000  # scheduler checks (about 5 ms apart when idle) before recomputing instead


def page_chain(tokens: list[int], page: int) -> list[int]:
    """One chained hash per whole page: equal prefixes of pages have equal chains."""
    chain, running = [], 0
    for start in range(0, len(tokens) - page + 1, page):
        running = hash((running, tuple(tokens[start:start + page])))
        chain.append(running)
    return chain


def _common_len(a: list[int], b: list[int]) -> int:
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
        self.last_pages: dict[tuple[str, str], list[int]] = {}  # (agent, namespace) -> page chain it computed
        self._admitted: set[int] = set()  # sequences whose hits are counted
        self._waits: dict[int, int] = {}

    def evict(self, num_blocks: int) -> int:
        before = self.pool.num_free
        self.manager.make_device_room(before + num_blocks)
        return self.pool.num_free - before

    def reserve_stacks(self, nbytes: int, exact: bool = False) -> bool:
        return self.manager.reserve_stacks(nbytes, exact)

    def state_ready(self, seq: Sequence) -> bool:
        """True when the sequence's weights and cached prefix (as far as it goes) are on the device;
        otherwise queue one on-demand load group for what is off the device and let the sequence
        wait. After MAX_PREFIX_WAITS checks a prefix still not loaded is recomputed instead, so
        nothing waits forever; weights are always waited for."""
        page = self.pool.block_size
        node, rest = self.cache.root(seq.namespace), tuple(seq.token_ids[:-1])
        path = []
        while len(rest) >= page:
            child = node.children.get(rest[:page])
            if child is None or child.resident is None:
                break
            common = self.cache.common_pages(child.tokens, rest)
            path.append(child.resident)
            if common * page < len(child.tokens):
                break
            node, rest = child, rest[len(child.tokens):]
        waits = self._waits.get(id(seq), 0)
        pending = [obj for obj in path if not obj.ready_on_device] if waits < MAX_PREFIX_WAITS else []
        weights = [h for h in seq.weights if not h.ready_on_device]
        if pending or weights:
            self._waits[id(seq)] = waits + 1
            self.manager.request_group(id(seq), weights + pending)
            return False
        self._waits.pop(id(seq), None)
        return True

    def used(self, seq: Sequence) -> None:
        loaded = self.manager.release_group(id(seq))  # admitted: its state is pinned now
        agent = seq.agent_id
        node = seq.cache_node
        while node is not None and not node.is_root:
            if node.resident is not None:
                self.manager.touch(node.resident, agent)
            node = node.parent
        for handle in seq.weights:
            self.manager.touch(handle, agent)
        if id(seq) not in self._admitted:
            self._admitted.add(id(seq))
            self._count(seq, loaded)

    def _count(self, seq: Sequence, loaded) -> None:
        """Hits by tier, and misses, of a request just admitted; `loaded` are the bytes loaded
        for it by (kind, source tier)."""
        stats, page = self.manager.stats, self.pool.block_size
        remaining = seq.num_cached_tokens
        for tier in ("disk", "host"):
            tokens = min(remaining, loaded.get(("kv", tier), 0) // self.pool.block_nbytes * page)
            if tokens:
                stats.add("hit", "kv", tokens, tier=tier)
                remaining -= tokens
        if remaining:
            stats.add("hit", "kv", remaining, tier="device")
        for handle in seq.weights:
            source = next((t for t in ("disk", "host") if loaded.get((handle.kind, t))), "device")
            stats.add("hit", handle.kind, tier=source)
        if seq.agent_id is not None:
            before = self.last_pages.get((seq.agent_id, seq.namespace), [])
            reusable = _common_len(before, page_chain(seq.token_ids, self.pool.block_size)) * self.pool.block_size
            if reusable > seq.num_cached_tokens:
                stats.add("miss", "kv", reusable - seq.num_cached_tokens)
                stats.add("recomputed_tokens", "kv", reusable - seq.num_cached_tokens)

    def finished(self, seq: Sequence) -> None:
        self.manager.release_group(id(seq))
        self._admitted.discard(id(seq))
        self._waits.pop(id(seq), None)
        if seq.agent_id is not None:
            self.last_pages[(seq.agent_id, seq.namespace)] = page_chain(
                seq.token_ids[: seq.num_computed_tokens], self.pool.block_size)

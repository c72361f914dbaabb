"""Continuous batching with chunked prefill and preemption by recompute.

Each step takes a token budget. Running sequences that are decoding come first (one token each),
then sequences part-way through their prompt, then waiting sequences, whose prompt is first
matched against the radix cache so that only the uncached part is computed. When the pool has no
free block, the memory layer evicts by policy; if that is not enough, the most recently admitted
running sequence is preempted (its pages freed, its tokens recomputed later). The stacked LoRA
buffers of the step's adapters take device room too, reserved before a sequence joins the batch.
A sequence samples a token in the step that computes its last uncomputed token. With a
speculator (engine/speculation.py), a decoding sequence also computes tokens drafted to follow
it, from the budget the step left and in pages taken only from free ones: a draft never delays
a prompt of its step, evicts or preempts (a page it took stays with the sequence for its later
tokens).

A waiting sequence whose prompt shares at least `IN_BATCH_SHARED_MIN_TOKENS` uncached tokens
with a prompt this step computes waits one step (SGLang's in-batch prefix caching): then it finds
them in the cache instead of computing them a second time. Simulations send such bursts, every
agent's call behind the same world description, at once.
"""

import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from scalesim.engine.block_pool import BlockPool
from scalesim.engine.radix_cache import RadixCache
from scalesim.engine.sequence import Sequence, SequenceStatus
from scalesim.engine.speculation import Speculator, speculates
from scalesim.layers.lora import stack_nbytes

logger = logging.getLogger(__name__)
IN_BATCH_SHARED_MIN_TOKENS = 32  # SGLang's IN_BATCH_PREFIX_CACHING_DEPRIORITIZE_THRESHOLD


@dataclass
class ScheduledSequence:
    """`num_new_tokens` tokens of `seq` computed this step: its uncomputed ones, then `draft`
    (guesses at its next tokens, verified by the step)."""

    seq: Sequence
    num_new_tokens: int
    draft: list[int] = field(default_factory=list)

    @property
    def num_certain_tokens(self) -> int:
        """The tokens computed this step that are the sequence's own (not drafted)."""
        return self.num_new_tokens - len(self.draft)

    @property
    def samples(self) -> bool:
        """True if this step computes the sequence's last uncomputed token, so it samples next."""
        return self.seq.num_computed_tokens + self.num_certain_tokens == self.seq.num_tokens


@dataclass
class SchedulerStats:
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    preemptions: int = 0
    evicted_blocks: int = 0
    steps: int = 0             # batches scheduled
    computed_tokens: int = 0   # tokens run through the model (prompt chunks and decodes)
    scheduled_seqs: int = 0    # sequences over all batches: / steps is the mean batch size
    shared_prefix_waits: int = 0  # admissions put off a step for a prefix another sequence was computing


class MemoryHooks(Protocol):
    """How the scheduler asks the memory layer for room and tells it what requests use."""

    def evict(self, num_blocks: int) -> int:
        """Free about `num_blocks` device blocks held by unpinned state; return how many were freed."""

    def state_ready(self, seq: Sequence) -> bool:
        """False while the sequence's weights or cached prefix pages are being brought to the device."""

    def used(self, seq: Sequence) -> None:
        """The sequence now holds (pins) its prefix pages and weights."""

    def reserve_stacks(self, nbytes: int, exact: bool = False) -> bool:
        """Hold at least (with `exact`: exactly) `nbytes` of device room for the step's stacked
        LoRA buffers; False if that room cannot be made."""


class Scheduler:
    def __init__(self, pool: BlockPool, cache: RadixCache, max_num_seqs: int, max_num_batched_tokens: int,
                 hooks: MemoryHooks, speculator: Speculator | None = None) -> None:
        self.pool = pool
        self.speculator = speculator
        self.cache = cache
        self.hooks = hooks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.stats = SchedulerStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSequence]:
        """Pick this step's sequences and token counts, allocating the pages they need."""
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSequence] = []
        stacks: dict[int, int] = {}  # the batch's adapters -> their bytes (stacked once per step)
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in self.running if s.num_uncomputed_tokens > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            if not self._stack_room(seq, stacks, batch):
                continue  # its adapter's stacks do not fit even after preempting: it waits
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._reserve(seq, num_new, batch):
                continue
            batch.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        not_ready: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting.popleft()
            if not self.hooks.state_ready(seq):
                not_ready.append(seq)  # its state is still loading: let the others run
                continue
            self._admit(seq)  # pins its weights and prefix first, so making room cannot evict them
            if self._computed_by_another(seq, batch):
                self._release(seq)
                self.stats.shared_prefix_waits += 1
                not_ready.append(seq)
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._stack_room(seq, stacks) or not self._reserve(seq, num_new, batch, may_preempt=False):
                self._release(seq)
                self.waiting.appendleft(seq)
                break
            self.stats.prompt_tokens += seq.num_tokens
            self.stats.cached_prompt_tokens += seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        self.waiting.extendleft(reversed(not_ready))
        self.hooks.reserve_stacks(sum(stacks.values()), exact=True)
        if self.speculator is not None and budget > 0:
            self._add_drafts(batch, budget)
        if batch:
            self.stats.steps += 1
            self.stats.computed_tokens += sum(item.num_new_tokens for item in batch)
            self.stats.scheduled_seqs += len(batch)
        return batch

    def _add_drafts(self, batch: list[ScheduledSequence], budget: int) -> None:
        """Give the batch's decoding sequences the speculator's drafts, within `budget` tokens,
        their max_tokens (a step keeps at most the draft plus one token) and the free pages."""
        decoding = [item for item in batch if item.num_new_tokens == 1 and item.samples and speculates(item.seq)
                    and len(item.seq.output_token_ids) + 1 < item.seq.params.max_tokens]
        candidates = [(item.seq, item.seq.params.max_tokens - len(item.seq.output_token_ids) - 1) for item in decoding]
        rows, tokens = sum(item.num_new_tokens for item in batch), sum(item.samples for item in batch)
        for item, draft in zip(decoding, self.speculator.plan(candidates, rows, tokens, budget)):
            seq = item.seq
            if not draft:
                continue
            need = self.pool.blocks_for(seq.num_tokens + len(draft)) - len(seq.block_table)
            if need > 0:
                seq.block_table.extend(self.pool.allocate(min(need, self.pool.num_free)) or [])
            item.draft = draft[:len(seq.block_table) * self.pool.block_size - seq.num_tokens]
            item.num_new_tokens += len(item.draft)

    def _computed_by_another(self, seq: Sequence, batch: list[ScheduledSequence]) -> bool:
        """True if a prompt chunk of this step's batch computes at least
        IN_BATCH_SHARED_MIN_TOKENS of `seq`'s prompt past what `seq` found cached."""
        start, tokens = seq.num_cached_tokens, seq.token_ids[:-1]
        probe = tokens[start:start + IN_BATCH_SHARED_MIN_TOKENS]
        if len(probe) < IN_BATCH_SHARED_MIN_TOKENS:
            return False
        for item in batch:
            other = item.seq
            computed_after = other.num_computed_tokens + item.num_new_tokens
            if (item.num_new_tokens <= 1 or other.namespace != seq.namespace
                    or computed_after < start + IN_BATCH_SHARED_MIN_TOKENS):
                continue
            theirs = other.token_ids[:computed_after]
            if theirs[start:start + IN_BATCH_SHARED_MIN_TOKENS] != probe:  # cheap test first
                continue
            shared = self.cache.common_pages(tokens, theirs) * self.pool.block_size
            if shared - start >= IN_BATCH_SHARED_MIN_TOKENS:
                return True
        return False

    def _stack_room(self, seq: Sequence, stacks: dict[int, int],
                    batch: list[ScheduledSequence] | None = None) -> bool:
        """Reserve room for the stacked buffers of the sequence's adapter, if the batch lacks it;
        for a running sequence (`batch` given), preempt others as `_reserve` does."""
        adapter = seq.adapter
        if adapter is None or id(adapter) in stacks:
            return True
        nbytes = stack_nbytes(adapter)
        while nbytes and not self.hooks.reserve_stacks(sum(stacks.values()) + nbytes):
            if batch is None or not self._preempt_other(seq, batch):
                return False
        stacks[id(adapter)] = nbytes
        return True

    def _admit(self, seq: Sequence) -> None:
        """Reuse the longest cached prefix (never all tokens: the last one must be computed)."""
        for handle in seq.weights:
            handle.pin()
        match = self.cache.match_prefix(seq.namespace, seq.token_ids[:-1])
        self.pool.incref(match.blocks)
        self.cache.lock(match.node)
        seq.block_table = list(match.blocks)
        seq.cache_node = match.node
        seq.num_computed_tokens = seq.num_cached_tokens = match.num_blocks * self.pool.block_size
        self.hooks.used(seq)

    def _reserve(self, seq: Sequence, num_new: int, batch: list[ScheduledSequence], may_preempt: bool = True) -> bool:
        """Give `seq` pages for `num_new` more tokens; evict cache, then preempt others if needed."""
        need = self.pool.blocks_for(seq.num_computed_tokens + num_new) - len(seq.block_table)
        while need > 0:
            blocks = self.pool.allocate(need)
            if blocks is not None:
                seq.block_table.extend(blocks)
                return True
            freed = self.hooks.evict(need - self.pool.num_free)
            self.stats.evicted_blocks += freed
            if freed > 0:
                continue
            if not may_preempt or not self._preempt_other(seq, batch):
                return False
        return True

    def _preempt_other(self, seq: Sequence, batch: list[ScheduledSequence]) -> bool:
        """Preempt the newest running sequence other than `seq` (or `seq` itself if it runs
        alone); False if that was `seq`."""
        candidates = [s for s in self.running if s is not seq]
        victim = candidates[-1] if candidates else seq
        self.preempt(victim)
        batch[:] = [s for s in batch if s.seq is not victim]
        return victim is not seq

    def preempt(self, seq: Sequence) -> None:
        """Free the sequence's pages and send it back to the front of the queue to recompute."""
        self._release(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(seq)
        logger.debug("preempted %s (%d tokens)", seq.request_id, seq.num_tokens)

    def _release(self, seq: Sequence) -> None:
        self.pool.decref(seq.block_table)
        if seq.cache_node is not None:
            self.cache.unlock(seq.cache_node)
            for handle in seq.weights:
                handle.unpin()
        seq.block_table, seq.cache_node = [], None

    def cache_computed(self, seq: Sequence) -> None:
        """Publish the sequence's computed whole pages in the radix cache and lock them."""
        node = self.cache.insert(seq.namespace, seq.token_ids[: seq.num_computed_tokens], seq.block_table)
        if node is not seq.cache_node:
            self.cache.lock(node)
            if seq.cache_node is not None:
                self.cache.unlock(seq.cache_node)
            seq.cache_node = node
            self.hooks.used(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End the sequence: cache what it computed, free its own references."""
        if seq.status is SequenceStatus.RUNNING:
            self.cache_computed(seq)
            self.running.remove(seq)
            self._release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
            self._release(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

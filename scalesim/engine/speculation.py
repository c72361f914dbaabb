"""Speculative decoding by prompt lookup (n-gram drafts), exact under greedy sampling.

A decode step on a CPU costs about one read of the weights whether it computes 1 token or 5 per
sequence, so a sequence whose next tokens can be guessed gets them checked all at once: the
step computes its last token plus up to k drafted tokens, and keeps the drafted tokens up to
the first one the model would not have picked, plus the model's own token after them. Every
kept token is the model's greedy choice, so the text is the one plain greedy decoding gives
(up to the last bits of the logits, which the linears' row count can change either way).

Drafts come from the sequence itself (prompt lookup, vLLM's `ngram` method): the last n tokens
(n from `max_ngram` down to `min_ngram`) are searched for earlier in the prompt and output, and
the k tokens that followed their latest earlier occurrence are the draft. Agents repeat their
prompt a lot (names, JSON keys, the options they were offered), which is what this finds.

Only requests whose next token is the plain argmax of the logits speculate: greedy, with no
logit bias, penalties or grammar (which change the logits per position), and no prompt logits.

A drafted token is not free: each is one more row through the model, and a rejected one is
wasted. Measured on the AMX Xeon (bf16), drafts of 4 tokens that were always wrong made a decode
step 1.1x slower at batch 1, 1.75x at batch 16 and 2.5x at batch 64. So the `Speculator` drafts
only where it pays, as SmartSpec does (goodput, Liu et al. 2024): it fits a step's seconds as
base + per_row x rows from the steps it saw, estimates each sequence's chance that a drafted
token is kept from its own record, and adds drafted tokens, the likeliest first, while each one's
expected kept tokens per second of its row beat the step's tokens per second.
"""

import heapq
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from scalesim.engine.logits_processors import needs_processing
from scalesim.engine.sequence import Sequence


class Drafter(Protocol):
    def draft(self, seq: Sequence, limit: int) -> list[int]:
        """Up to `limit` tokens guessed to follow `seq`'s tokens ([] for none). The scheduler
        asks only for sequences that `speculates` accepts."""


@dataclass(frozen=True)
class PromptLookup:
    """Drafts of up to `num_tokens` tokens from the sequence's own earlier tokens."""

    num_tokens: int
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need num_tokens >= 1 and 1 <= min_ngram <= max_ngram, got {self}")

    def draft(self, seq: Sequence, limit: int) -> list[int]:
        """Up to min(num_tokens, limit) tokens that may follow `seq`'s tokens; [] when nothing
        earlier matches its last tokens."""
        limit = min(limit, self.num_tokens)
        if limit <= 0:
            return []
        return lookup(seq.token_ids, limit, self.max_ngram, self.min_ngram)


def speculates(seq: Sequence) -> bool:
    """True if `seq`'s next token is the argmax of its raw logits, so drafts can be verified by
    comparing them with the argmax at each position."""
    return seq.params.greedy and not needs_processing(seq) and not seq.want_prompt_logits


def lookup(tokens: list[int], num_tokens: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The up to `num_tokens` tokens after the latest earlier occurrence of the longest suffix of
    `tokens` of `max_ngram` down to `min_ngram` tokens that occurs earlier; [] if none does.
    One pass over the tokens finds the earlier places of the last token; longer n-grams only
    check those (about 0.07 ms for 4,000 tokens, most of it making the array)."""
    ids = np.asarray(tokens, dtype=np.int64)
    ends = np.flatnonzero(ids[:-1] == ids[-1])  # where an earlier n-gram may end
    for n in range(min(max_ngram, len(ids) - 1), min_ngram - 1, -1):
        hits = ends[ends >= n - 1]
        for back in range(1, n):
            hits = hits[ids[hits - back] == ids[-1 - back]]
        if hits.size:
            start = int(hits[-1]) + 1
            return ids[start:start + num_tokens].tolist()
    return []


# How the goodput rule learns (see `StepCost` and `Speculator`).
STEP_COST_DECAY = 0.97     # each step seen weighs this much less per later step (about 33 steps count)
STEP_COST_MAX_ROWS = 512   # longer steps (prompt chunks) are left out of the fit
STEP_COST_MIN_WEIGHT = 4   # steps seen (decayed) before the fit prices a row
STEP_COST_MIN_SPREAD_ROWS = 2  # and the spread of their rows (standard deviation)
ACCEPTANCE_PRIOR_STEPS = 2     # a sequence's acceptance starts as this many steps at the engine's rate
ACCEPTANCE_DECAY = 0.98        # the engine's rate forgets old drafts this fast (per draft verified)


@dataclass
class StepCost:
    """A step's seconds as `base_s + per_row_s * rows`, fitted by least squares over the steps of
    up to STEP_COST_MAX_ROWS rows seen, each weighing STEP_COST_DECAY less per step since. Long
    prompt chunks are left out: their attention grows faster than their rows, which would bend
    the line and could push its base below zero."""

    weight: float = field(default=0.0, init=False)
    sum_rows: float = field(default=0.0, init=False)
    sum_s: float = field(default=0.0, init=False)
    sum_rows2: float = field(default=0.0, init=False)
    sum_rows_s: float = field(default=0.0, init=False)

    def add(self, rows: int, seconds: float) -> None:
        if rows > STEP_COST_MAX_ROWS:
            return
        d = STEP_COST_DECAY
        self.weight = self.weight * d + 1.0
        self.sum_rows = self.sum_rows * d + rows
        self.sum_s = self.sum_s * d + seconds
        self.sum_rows2 = self.sum_rows2 * d + rows * rows
        self.sum_rows_s = self.sum_rows_s * d + rows * seconds

    def fit(self) -> tuple[float, float] | None:
        """(base_s, per_row_s); None until enough steps were seen with rows spread enough, or when
        the line they give has no positive base or a negative slope (no price to trust). When the
        rows stop varying (no drafts at a steady batch), old steps fade and this turns None again,
        so the speculator drafts once more: its only exploration."""
        w, x, y = self.weight, self.sum_rows, self.sum_s
        variance = w * self.sum_rows2 - x * x  # w^2 times the rows' weighted variance
        if w < STEP_COST_MIN_WEIGHT or variance < (STEP_COST_MIN_SPREAD_ROWS * w) ** 2:
            return None
        per_row = (w * self.sum_rows_s - x * y) / variance
        base = (y - per_row * x) / w
        return (base, per_row) if base > 0 and per_row >= 0 else None


@dataclass
class Speculator:
    """Decides each step's drafts: `drafter` proposes, the goodput rule disposes."""

    drafter: Drafter
    cost: StepCost = field(default_factory=StepCost)
    kept: float = 0.0    # drafted tokens the model agreed with, over all sequences (decayed)
    missed: float = 0.0  # steps whose draft had a rejected token (decayed)

    def acceptance(self, seq: Sequence) -> float:
        """The chance that a drafted token of `seq` is kept given the ones before it were: the
        sequence's own record, behind a prior of ACCEPTANCE_PRIOR_STEPS steps at the engine's
        recent rate (itself behind one kept and one missed)."""
        overall = (self.kept + 1) / (self.kept + self.missed + 2)
        prior = ACCEPTANCE_PRIOR_STEPS
        return (seq.draft_kept + prior * overall) / (seq.draft_kept + seq.draft_missed + prior)

    def plan(self, candidates: list[tuple[Sequence, int]], rows: int, tokens: int, budget: int) -> list[list[int]]:
        """Each candidate's draft (a list per (sequence, most tokens) pair, in order), for a step of
        `rows` rows that yields `tokens` tokens before drafts, within `budget` drafted tokens."""
        if not candidates:
            return []
        fit = self.cost.fit()
        if fit is None:  # no price to trust yet: draft, which also spreads the rows to fit
            return _within([self.drafter.draft(seq, limit)[:limit] for seq, limit in candidates], budget)
        base_s, per_row_s = fit
        seconds = base_s + per_row_s * rows  # > 0: the fit's base is
        # a row pays if its chance of a kept token beats this bar, which only rises as rows are
        # added: a sequence whose first drafted token would not pass is not asked for a draft
        bar = per_row_s * tokens / seconds
        chances = [self.acceptance(seq) for seq, _ in candidates]
        drafts = [self.drafter.draft(seq, limit)[:limit] if chance > bar else []
                  for (seq, limit), chance in zip(candidates, chances)]
        gains = [(-chance ** (j + 1), i, j) for i, (chance, draft) in enumerate(zip(chances, drafts))
                 for j in range(len(draft))]
        heapq.heapify(gains)
        taken = [0] * len(drafts)
        expected = float(tokens)
        while gains and budget > 0:
            gain, i, j = heapq.heappop(gains)
            if -gain * seconds <= per_row_s * expected:  # this row would lower the step's tokens per second
                break
            taken[i] = max(taken[i], j + 1)
            expected, seconds, budget = expected - gain, seconds + per_row_s, budget - 1
        return [draft[:n] for draft, n in zip(drafts, taken)]

    def observe(self, rows: int, seconds: float) -> None:
        self.cost.add(rows, seconds)

    def record(self, seq: Sequence, drafted: int, kept: int) -> None:
        """A step verified `drafted` tokens of `seq`, and the model chose the first `kept` too."""
        missed = int(kept < drafted)
        seq.draft_kept += kept
        seq.draft_missed += missed
        self.kept = self.kept * ACCEPTANCE_DECAY + kept
        self.missed = self.missed * ACCEPTANCE_DECAY + missed


def _within(drafts: list[list[int]], budget: int) -> list[list[int]]:
    out = []
    for draft in drafts:
        out.append(draft[:max(budget, 0)])
        budget -= len(out[-1])
    return out

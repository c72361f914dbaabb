"""Which engine replica serves an agent: slots, rendezvous hashing over replica ranks, a load bound.

An agent id maps to one of `num_slots` slots (a stable hash, so every process agrees); a slot maps
to replicas ranked by rendezvous (highest-random-weight) hashing over the live replicas' *ranks*.
Ranks, not replica ids: Ray Serve gives a restarted replica its old rank back, so it gets its old
slots back, and adding a replica moves only the slots the new rank wins (about 1/N of them).
Every ingress replica computes the same order from the same ranks, without coordination.

The load bound: an agent that has nothing on its owner yet (cold) goes to the next replica in its
order while the owner's queue is over `spill_factor` x the mean queue (and over a few requests);
an agent that has been served (warm) always goes where it was served, unless that replica is gone.

Pure Python, shared by the Serve router (`router.py`) and the ingress (`ingress.py`).
"""

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field

DEFAULT_NUM_SLOTS = 4096
DEFAULT_SPILL_FACTOR = 1.25
MIN_SPILL_QUEUE = 4  # requests: a queue this short never spills (the engine batches them together)
MAX_REMEMBERED_AGENTS = 1_000_000  # where each agent was served; the oldest are forgotten past this


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def slot_of(agent_id: str, num_slots: int = DEFAULT_NUM_SLOTS) -> int:
    """The agent's slot: the same in every process and across restarts (no salted `hash()`)."""
    return _hash64(agent_id) % num_slots


def rendezvous_order(slot: int, ranks: list[int]) -> list[int]:
    """`ranks` ordered by their rendezvous weight for `slot`, the owner first. Removing a rank
    promotes the next one for its slots only; adding one takes only the slots it wins."""
    return sorted(ranks, key=lambda rank: _hash64(f"{slot}/{rank}"), reverse=True)


@dataclass
class SlotTable:
    """Slot -> replica overrides on top of rendezvous hashing, with an epoch that changes with
    them. Empty overrides mean pure rendezvous; a planned move pins a slot to its target."""

    num_slots: int = DEFAULT_NUM_SLOTS
    overrides: dict[int, int] = field(default_factory=dict)
    epoch: int = 0

    def order(self, agent_id: str, live_ranks: list[int]) -> list[int]:
        """The live replicas to try for `agent_id`, best first."""
        return self.order_of_slot(slot_of(agent_id, self.num_slots), live_ranks)

    def order_of_slot(self, slot: int, live_ranks: list[int]) -> list[int]:
        """The live replicas to try for the agents of `slot`, best first."""
        order = rendezvous_order(slot, live_ranks)
        pinned = self.overrides.get(slot)
        if pinned is not None and pinned in order:
            order.remove(pinned)
            order.insert(0, pinned)
        return order

    def owners(self, live_ranks: list[int]) -> list[int]:
        """The owner of every slot (for counting moved slots)."""
        return [self.order_of_slot(s, live_ranks)[0] for s in range(self.num_slots)]


def spill_bound(queue_lens: dict[int, int], spill_factor: float) -> float:
    """The longest queue (with the new request) a cold agent may join: c x the mean queue, but
    never under MIN_SPILL_QUEUE, so that one request in flight on an idle cluster spills no one."""
    return spill_factor * max(sum(queue_lens.values()) / len(queue_lens), MIN_SPILL_QUEUE)


@dataclass
class Decision:
    order: list[int]  # replicas to try, best first; order[0] is where the request goes
    owner: int  # the slot's owner among the live replicas
    spilled: bool  # this request spilled a cold agent past its owner (not repeated for its later calls)


class AffinePlacement:
    """The routing decision for one request: owner by slot, warm agents sticky, cold agents spill
    past an overloaded owner. Remembers, per agent (bounded, oldest forgotten first), whether it
    was served at its slot's owner or spilled to another replica, so that a spilled agent stays
    where its state now is, and an agent served by a fallback while its owner was down goes home
    when the owner is back (its disk tier still holds the agent's older state)."""

    def __init__(self, table: SlotTable | None = None, spill_factor: float = DEFAULT_SPILL_FACTOR,
                 max_remembered: int = MAX_REMEMBERED_AGENTS) -> None:
        if spill_factor < 1.0:
            raise ValueError(f"spill_factor must be at least 1, got {spill_factor}")
        self.table = table or SlotTable()
        self.spill_factor = spill_factor
        self.max_remembered = max_remembered
        self.spilled_to: OrderedDict[str, int | None] = OrderedDict()  # agent -> rank, None = at its owner

    def decide(self, agent_id: str, queue_lens: dict[int, int]) -> Decision:
        """Where `agent_id`'s request goes, given the live replicas' queue lengths by rank."""
        if not queue_lens:
            raise ValueError("no live replica")
        order = self.table.order(agent_id, sorted(queue_lens))
        owner = order[0]
        warm = agent_id in self.spilled_to
        target = self.spilled_to.get(agent_id)
        if target not in queue_lens:  # at its owner, or its spill target is gone
            target = owner if warm else self._first_within_bound(order, queue_lens)
        order.remove(target)
        order.insert(0, target)
        self._remember(agent_id, None if target == owner else target)
        return Decision(order, owner, spilled=not warm and target != owner)

    def target(self, agent_id: str, live_ranks: list[int]) -> int:
        """Where the agent's state is, without deciding anything: its spill replica if it spilled
        and that replica lives, else its slot's owner (where hints about it go)."""
        spilled_to = self.spilled_to.get(agent_id)
        return spilled_to if spilled_to in live_ranks else self.table.order(agent_id, live_ranks)[0]

    def _first_within_bound(self, order: list[int], queue_lens: dict[int, int]) -> int:
        """The first replica in `order` whose queue, with this request, stays within the bound."""
        bound = spill_bound(queue_lens, self.spill_factor)
        return next((rank for rank in order if queue_lens[rank] + 1 <= bound), order[0])

    def _remember(self, agent_id: str, spilled_to: int | None) -> None:
        self.spilled_to[agent_id] = spilled_to
        self.spilled_to.move_to_end(agent_id)
        while len(self.spilled_to) > self.max_remembered:
            self.spilled_to.popitem(last=False)

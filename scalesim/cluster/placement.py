"""Which engine replica serves an agent: slots, rendezvous hashing over replica ranks, a load bound.

An agent id maps to one of `num_slots` slots (a stable hash, so every process agrees); a slot maps
to replicas ranked by rendezvous (highest-random-weight) hashing over the live replicas' *ranks*.
Ranks, not replica ids: a replica's rank is the number of its state folder (state_folders.py), so a
restarted replica gets its old slots back, and adding a replica moves only the slots the new rank
wins (about 1/N of them).
Every ingress replica computes the same order from the same ranks, without coordination.

The load bound: an agent that has nothing anywhere yet (cold) goes to the next replica in its
order while the owner's queue is over `spill_factor` x the mean queue (and over a few requests).
An agent that has been served (warm) goes where its state is: where it was placed, also after
a replica joins and wins its slot, until a planned move (`moves.py`) takes its state to the new
owner. While the replica holding it is down it is served by its next-ranked replica, and goes
back when that replica returns with its disk tier.

Pure Python, shared by the Serve router (`router.py`) and the ingress (`ingress.py`).
"""

import functools
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

ROUTING_NAMES = ("affine", "random", "power-of-two")  # the router's policies (router.ROUTINGS), by name
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
    return list(_rendezvous_order(slot, tuple(ranks)))


@functools.lru_cache(maxsize=1 << 16)  # slots x rank sets seen: every routing decision and hint asks
def _rendezvous_order(slot: int, ranks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(ranks, key=lambda rank: _hash64(f"{slot}/{rank}"), reverse=True))


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


@dataclass(frozen=True)
class Placed:
    rank: int  # the replica that holds the agent's state
    spilled: bool  # placed there by the load bound, not as its slot's owner (a rebalance leaves it)


class AffinePlacement:
    """The routing decision for one request: owner by slot, warm agents where their state is,
    cold agents spill past an overloaded owner. Remembers, per agent (bounded, oldest forgotten
    first), the replica that holds its state. Thread-safe: Serve's router decides on its own
    thread while the ingress places moved agents."""

    def __init__(self, table: SlotTable | None = None, spill_factor: float = DEFAULT_SPILL_FACTOR,
                 max_remembered: int = MAX_REMEMBERED_AGENTS) -> None:
        if spill_factor < 1.0:
            raise ValueError(f"spill_factor must be at least 1, got {spill_factor}")
        self.table = table or SlotTable()
        self.spill_factor = spill_factor
        self.max_remembered = max_remembered
        self.placed: OrderedDict[str, Placed] = OrderedDict()
        self.by_slot: dict[int, set[str]] = {}  # the remembered agents of each slot
        self.lock = threading.Lock()

    def decide(self, agent_id: str, queue_lens: dict[int, int]) -> Decision:
        """Where `agent_id`'s request goes, given the live replicas' queue lengths by rank."""
        if not queue_lens:
            raise ValueError("no live replica")
        order = self.table.order(agent_id, sorted(queue_lens))
        owner = order[0]
        with self.lock:
            placed = self.placed.get(agent_id)
            if placed is None:  # cold
                target = self._first_within_bound(order, queue_lens)
                self._place(agent_id, Placed(target, spilled=target != owner))
            else:  # warm: where its state is; its next-ranked replica while that one is down
                target = placed.rank if placed.rank in queue_lens else owner
                self.placed.move_to_end(agent_id)
        order.remove(target)
        order.insert(0, target)
        return Decision(order, owner, spilled=placed is None and target != owner)

    def target(self, agent_id: str, live_ranks: list[int]) -> int:
        """Where the agent's state is, without deciding anything (where hints about it go): the
        replica it was placed on if that one lives, else its slot's owner."""
        placed = self.placed.get(agent_id)
        return placed.rank if placed is not None and placed.rank in live_ranks \
            else self.table.order(agent_id, live_ranks)[0]

    def home(self, agent_id: str, live_ranks: list[int]) -> int:
        """Where the agent's state belongs: the replica it spilled to while that one lives, else
        its slot's owner (a rebalance moves it there)."""
        placed = self.placed.get(agent_id)
        return placed.rank if placed is not None and placed.spilled and placed.rank in live_ranks \
            else self.table.order(agent_id, live_ranks)[0]

    def place(self, agent_id: str, rank: int, spilled: bool = False) -> None:
        """Remember that `rank` holds the agent's state (a move took it there)."""
        with self.lock:
            self._place(agent_id, Placed(rank, spilled))

    def follow_pins(self, slots: set[int]) -> None:
        """The pins of `slots` changed: their agents are placed on their slot's pinned replica,
        or cold again where a slot was unpinned."""
        with self.lock:
            for slot in slots:
                pinned = self.table.overrides.get(slot)
                for agent in list(self.by_slot.get(slot, ())):
                    if pinned is None:
                        self._forget(agent)
                    else:
                        self._place(agent, Placed(pinned, False))

    def _place(self, agent_id: str, placed: Placed) -> None:
        self.placed[agent_id] = placed
        self.placed.move_to_end(agent_id)
        self.by_slot.setdefault(slot_of(agent_id, self.table.num_slots), set()).add(agent_id)
        while len(self.placed) > self.max_remembered:
            self._forget(next(iter(self.placed)))

    def _forget(self, agent_id: str) -> None:
        del self.placed[agent_id]
        slot = slot_of(agent_id, self.table.num_slots)
        self.by_slot[slot].discard(agent_id)
        if not self.by_slot[slot]:
            del self.by_slot[slot]

    def _first_within_bound(self, order: list[int], queue_lens: dict[int, int]) -> int:
        """The first replica in `order` whose queue, with this request, stays within the bound."""
        bound = spill_bound(queue_lens, self.spill_factor)
        return next((rank for rank in order if queue_lens[rank] + 1 <= bound), order[0])

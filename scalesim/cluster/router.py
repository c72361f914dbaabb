"""The Ray Serve request router of the engine deployment: agent-affine, by slot and replica rank.

Serve calls `choose_replicas` for every request sent through a handle to the engine deployment;
the ingress passes a `Route` with the request. A route naming a rank (hints split by owner,
`/metrics` fan-out) goes to that replica; a route naming an agent goes where the routing policy
says; a route naming neither goes to the shortest queue. Each replica publishes its rank through
`record_replica_metadata`: the number of the state folder it claimed (state_folders.py), so a
restarted replica's slots come back to it.

Serve builds the router in the ingress's process (on its own event-loop thread); the ingress
reads the router's view of the live replicas and its counters through `shared_view()`.

The RequestRouter API is alpha in Ray 2.60 (pinned in pyproject); tests/test_cluster.py covers it.
"""

import importlib
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from scalesim.cluster.placement import DEFAULT_SPILL_FACTOR, ROUTING_NAMES, AffinePlacement, SlotTable


@dataclass
class Route:
    """What the ingress knows about a request when it sends it: the agent, or a rank to reach."""

    agent_id: str | None = None
    rank: int | None = None


@dataclass
class RoutingView:
    """The router's state as the ingress reads it (one per process)."""

    placement: AffinePlacement = field(default_factory=AffinePlacement)
    routing: str = "affine"  # the router's policy (a key of ROUTINGS)
    live_ranks: list[int] = field(default_factory=list)
    requests_by_rank: dict[int, int] = field(default_factory=dict)
    down_ranks: set[int] = field(default_factory=set)  # died and not back yet (a scale-down is not a death)
    spills: int = 0  # cold agents sent past an overloaded owner
    fallbacks: int = 0  # agent requests sent elsewhere because the agent's owner had died
    misrouted_hints: int = 0  # hinted agents whose owner had died (the hint went to its fallback)
    moves: int = 0  # agents whose state a planned move took to another replica
    moved_nbytes: int = 0  # bytes of the KV files those moves stored
    adopted_nbytes: int = 0  # bytes of KV files taken in from the state folders of removed replicas

    def target(self, agent_id: str) -> int | None:
        """The live replica that holds `agent_id`'s state now (where its hints go)."""
        return self.placement.target(agent_id, self.live_ranks) if self.live_ranks else None

    def owner_is_down(self, agent_id: str) -> bool:
        """Whether the agent's slot belongs to a replica that died and is not back yet."""
        if not self.down_ranks:
            return False
        every_rank = sorted(set(self.live_ranks) | self.down_ranks)
        return self.placement.table.order(agent_id, every_rank)[0] in self.down_ranks


VIEW = RoutingView()


def shared_view() -> RoutingView:
    """This process's RoutingView. Serve ships router and ingress classes by value (cloudpickle),
    with copies of their module globals, so both look the view up in the imported module."""
    return importlib.import_module(__name__).VIEW


def _route(pending_request: PendingRequest | None) -> Route:
    """The request's Route. Read by its fields: Serve may ship the ingress's classes by value,
    so the Route that arrives need not be an instance of this module's class."""
    route = pending_request.kwargs.get("route") if pending_request is not None else None
    return Route(getattr(route, "agent_id", None), getattr(route, "rank", None))


# --- routing policies: (router, agent, replicas by rank, queue lengths by rank) -> replica groups to try
Policy = Callable[["AgentAffineRouter", str, dict[int, RunningReplica], dict[int, int]], list[list[RunningReplica]]]


def _affine(router: "AgentAffineRouter", agent_id: str, by_rank: dict, queue_lens: dict) -> list[list]:
    """Owner by slot, warm agents sticky, cold agents spill past an overloaded owner."""
    decision = router.view.placement.decide(agent_id, queue_lens)
    router.view.spills += decision.spilled
    router.view.fallbacks += router.view.owner_is_down(agent_id)
    return [[by_rank[rank]] for rank in decision.order]


def _random(router: "AgentAffineRouter", agent_id: str, by_rank: dict, queue_lens: dict) -> list[list]:
    """Any live replica, uniformly."""
    return [[by_rank[rank]] for rank in random.sample(sorted(by_rank), len(by_rank))]


def _power_of_two(router: "AgentAffineRouter", agent_id: str, by_rank: dict, queue_lens: dict) -> list[list]:
    """Two random replicas; Serve sends to the one with the shorter queue. This is what Serve's
    default router does on one node (it prefers replicas on its own node first)."""
    return [random.sample(list(by_rank.values()), min(2, len(by_rank)))]


ROUTINGS: dict[str, Policy] = dict(zip(ROUTING_NAMES, (_affine, _random, _power_of_two)))


class AgentAffineRouter(RequestRouter):
    """`request_router_kwargs`: routing (a key of ROUTINGS, default affine), spill_factor (default
    1.25), num_slots (default 4096). Every policy routes rank-addressed requests by rank."""

    def initialize_state(self, routing: str = "affine", spill_factor: float = DEFAULT_SPILL_FACTOR,
                         num_slots: int | None = None) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        self.policy = ROUTINGS[routing]
        self.view = shared_view()
        self.view.routing = routing
        table = self.view.placement.table  # pins the ingress may have read already stay
        if num_slots is not None and num_slots != table.num_slots:
            table = SlotTable(num_slots)
        self.view.placement = AffinePlacement(table, spill_factor)

    @staticmethod
    def _rank_of(replica: RunningReplica) -> int | None:
        return replica.replica_metadata.get("rank")

    def _publish_live_ranks(self) -> None:
        live = sorted(r for r in map(self._rank_of, self.curr_replicas.values()) if r is not None)
        self.view.down_ranks -= set(live)
        self.view.live_ranks = live

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._publish_live_ranks()

    def on_replica_actor_died(self, replica_id) -> None:
        replica = self.curr_replicas.get(replica_id)
        rank = self._rank_of(replica) if replica is not None else None
        super().on_replica_actor_died(replica_id)
        if rank is not None:
            self.view.down_ranks.add(rank)
        self._publish_live_ranks()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        by_rank = {self._rank_of(r): r for r in candidate_replicas if self._rank_of(r) is not None}
        if not by_rank:  # ranks not published yet
            return [candidate_replicas]
        route = _route(pending_request)
        if route.rank is not None:  # a replica gone since the ingress looked: any replica answers
            return [[by_rank[route.rank]]] if route.rank in by_rank else [candidate_replicas]
        queue_lens = {rank: self.replica_queue_len_cache.get(r.replica_id) or 0 for rank, r in by_rank.items()}
        if route.agent_id is None:
            return [[by_rank[rank]] for rank in sorted(by_rank, key=lambda rank: (queue_lens[rank], random.random()))]
        return self.policy(self, route.agent_id, by_rank, queue_lens)

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        replica = self.curr_replicas.get(replica_id)
        rank = self._rank_of(replica) if replica is not None else None
        if rank is not None:
            self.view.requests_by_rank[rank] = self.view.requests_by_rank.get(rank, 0) + 1

"""The Ray Serve request router of the engine deployment: agent-affine, by slot and replica rank.

Serve calls `choose_replicas` for every request sent through a handle to the engine deployment;
the ingress passes a `Route` with the request. A route naming a rank (hints split by owner,
`/metrics` fan-out) goes to that replica; a route naming an agent goes where `AffinePlacement`
says (owner by rendezvous over the live ranks, warm agents sticky, cold agents spill past an
overloaded owner); a route naming neither goes to the shortest queue. Each replica publishes its
rank through `record_replica_metadata`, and Serve gives a restarted replica its old rank, so its
slots come back to it.

Serve builds one router per handle, in the ingress's process; the ingress reads the router's
view of the live replicas and its counters through `RoutingView` (one per process).

The RequestRouter API is alpha in Ray 2.60 (pinned in pyproject); tests/test_cluster.py covers it.
"""

import importlib
import random
from dataclasses import dataclass, field

from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.replica_wrapper import RunningReplica
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

from scalesim.cluster.placement import DEFAULT_SPILL_FACTOR, AffinePlacement, SlotTable

ROUTINGS = ("affine", "random", "power-of-two")


@dataclass
class Route:
    """What the ingress knows about a request when it sends it: the agent, or a rank to reach."""

    agent_id: str | None = None
    rank: int | None = None


@dataclass
class RoutingView:
    """The router's state as the ingress reads it (one per process)."""

    placement: AffinePlacement = field(default_factory=AffinePlacement)
    live_ranks: list[int] = field(default_factory=list)
    requests_by_rank: dict[int, int] = field(default_factory=dict)
    spills: int = 0
    fallbacks: int = 0  # requests whose agent's owner (over all known ranks) was not live

    def owner(self, agent_id: str) -> int | None:
        """The live replica that owns `agent_id`'s slot now."""
        return self.placement.table.order(agent_id, self.live_ranks)[0] if self.live_ranks else None


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


class AgentAffineRouter(ConsistentHashRouter):
    """`request_router_kwargs`: routing, spill_factor (default 1.25), num_slots (default 4096).
    Routing 'affine' is the placement above; 'random' picks any live replica; 'power-of-two'
    offers two random replicas and Serve sends to the one with the shorter queue, which is what
    Serve's default router does on one node (it prefers replicas on its own node first). Every
    mode routes rank-addressed requests (hints, /metrics) by rank.

    Built on Serve's ConsistentHashRouter for its routing loop only (each routing task sends
    the request it chose replicas for; the base loop may hand the choice to another pending
    request, which sends a rank-addressed hint to the wrong replica); its ring is not used."""

    def initialize_state(self, routing: str = "affine", spill_factor: float = DEFAULT_SPILL_FACTOR,
                         num_slots: int | None = None, **_) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        self.routing = routing
        self.view = shared_view()
        self.view.placement = AffinePlacement(SlotTable(num_slots) if num_slots else SlotTable(), spill_factor)
        self.ever_seen_ranks: set[int] = set()

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self.view.live_ranks = sorted(self._rank_of(r) for r in replicas if self._rank_of(r) is not None)
        self.ever_seen_ranks.update(self.view.live_ranks)

    def on_replica_actor_died(self, replica_id) -> None:
        super().on_replica_actor_died(replica_id)
        self.view.live_ranks = sorted(r for r in (self._rank_of(x) for x in self._replicas.values()) if r is not None)

    @staticmethod
    def _rank_of(replica: RunningReplica) -> int | None:
        return replica.replica_metadata.get("rank")

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
        if route.rank is not None:  # gone since the ingress looked: any replica answers (a hint is kept there)
            return [[by_rank[route.rank]]] if route.rank in by_rank else [candidate_replicas]
        queue_lens = {rank: self.replica_queue_len_cache.get(r.replica_id) or 0 for rank, r in by_rank.items()}
        if route.agent_id is None:
            order = sorted(by_rank, key=lambda rank: (queue_lens[rank], random.random()))
        elif self.routing == "random":
            order = random.sample(sorted(by_rank), len(by_rank))
        elif self.routing == "power-of-two":
            return [random.sample(list(by_rank.values()), min(2, len(by_rank)))]
        else:
            decision = self.view.placement.decide(route.agent_id, queue_lens)
            order = decision.order
            self.view.spills += decision.spilled
            full_owner = self.view.placement.table.order(route.agent_id, sorted(self.ever_seen_ranks))[0]
            self.view.fallbacks += full_owner not in by_rank
        return [[by_rank[rank]] for rank in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        replica = self._replicas.get(replica_id)
        rank = self._rank_of(replica) if replica is not None else None
        if rank is not None:
            self.view.requests_by_rank[rank] = self.view.requests_by_rank.get(rank, 0) + 1

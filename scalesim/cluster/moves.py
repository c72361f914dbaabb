"""Planned moves: an agent's KV state goes to another replica before its requests do.

A move of agents from replica S to replica T (run by the ingress, one batch of agents at a time):
1. S exports each agent's KV nodes as the disk tier's self-verifying files (memory/agent_kv.py);
2. T verifies them, stores them in its disk tier and attaches them to its radix tree, owned by
   the agent, so that a hint about the agent prefetches them;
3. the routing flips: this ingress places the agents on T (for a slot pin, the slot table's
   epoch moves too, and every ingress replica reads it within a second);
4. S drops what only those agents used (pages a running request holds stay, evicted later).
A request that reaches S between 1 and 3 extends the agent's history on S only; T recomputes
that last turn. Nothing is lost if a step fails: the agents stay routed to S.

`plan_rebalance` lists the moves that take every agent's state home (its slot's owner, or the
replica it spilled to), far-future agents first: those are the least likely to be called while
they move. When a replica joins (a scale-up, or a restarted replica whose agents were served by
others meanwhile) the ingress registers at it the agents another replica knows, then runs a
rebalance; `POST /v1/rebalance` runs one too.
"""

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from itertools import groupby

from scalesim.cluster.placement import AffinePlacement
from scalesim.cluster.router import Route, RoutingView

logger = logging.getLogger(__name__)
BATCH_AGENTS = 16  # agents per export/import call


@dataclass(frozen=True)
class Move:
    agent_id: str
    source: int
    target: int
    distance: float  # steps until the agent's next call as the source sees it (inf: unknown)
    nbytes: int  # KV bytes only this agent uses on the source


def far_future_first(move: Move) -> tuple:
    return (-move.distance, move.agent_id)


def plan_rebalance(held: dict[int, dict[str, dict]], placement: AffinePlacement, live_ranks: list[int]) -> list[Move]:
    """The moves that take each agent's state, on replica `rank` per `held[rank]` (agent ->
    {nbytes, distance}), to its home replica; far-future agents first."""
    moves = []
    for rank, agents in held.items():
        for agent, info in agents.items():
            home = placement.home(agent, live_ranks)
            if home != rank:
                distance = info.get("distance")
                moves.append(Move(agent, rank, home, math.inf if distance is None else float(distance), info["nbytes"]))
    return sorted(moves, key=far_future_first)


@dataclass
class MoveReport:
    moved: int = 0  # agents whose state reached the target and whose requests go there now
    failed: int = 0  # agents left where they were (a step failed)
    nbytes: int = 0  # bytes of the files the targets stored
    attached: int = 0  # KV nodes the targets attached
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"moved": self.moved, "failed": self.failed, "nbytes": self.nbytes, "attached": self.attached,
                "errors": self.errors[:10]}


class Mover:
    """Runs moves through the engine deployment's handle; one batch of agents at a time.
    `call(make_call)` makes a handle call under its own request id (ingress.alone)."""

    def __init__(self, engine, view: Callable[[], RoutingView], call: Callable[[Callable[[], Awaitable]], Awaitable]) -> None:
        self.engine = engine
        self.view = view
        self.call = call
        self.lock = asyncio.Lock()  # one planned change at a time in this ingress
        self.task: asyncio.Task | None = None

    async def held(self, ranks: list[int]) -> dict[int, dict[str, dict]]:
        """Each live replica's agents with KV of their own there (a replica that fails to answer is left out)."""
        answers = await asyncio.gather(*(self.call(lambda r=r: self.engine.agents_with_kv.remote(route=Route(rank=r)))
                                         for r in ranks), return_exceptions=True)
        return {r: a for r, a in zip(ranks, answers) if isinstance(a, dict)}

    async def move(self, moves: list[Move], flip: Callable[[list[Move]], Awaitable[None]] | None = None) -> MoveReport:
        """Run `moves` in order, in batches of agents with one source and target. `flip(batch)`
        switches their routing (default: place them on the target in this ingress)."""
        report = MoveReport()
        view = self.view()
        for (source, target), run in groupby(moves, key=lambda m: (m.source, m.target)):
            run = list(run)
            for start in range(0, len(run), BATCH_AGENTS):
                batch = run[start:start + BATCH_AGENTS]
                agents = [m.agent_id for m in batch]
                try:
                    files = await self.call(lambda: self.engine.export_agents.remote(agents, route=Route(rank=source)))
                    result = await self.call(lambda: self.engine.import_agents.remote(files, route=Route(rank=target)))
                    if flip is None:
                        for m in batch:
                            view.placement.place(m.agent_id, target)
                    else:
                        await flip(batch)
                except Exception as exc:  # the agents stay where they are, routed there
                    logger.warning("moving %d agents from replica %d to %d failed: %s", len(batch), source, target, exc)
                    report.failed += len(batch)
                    report.errors.append(f"{source}->{target}: {exc}")
                    continue
                report.moved += len(batch)
                report.nbytes += result["nbytes"]
                report.attached += result["attached"]
                view.moves += len(batch)
                view.moved_nbytes += result["nbytes"]
                try:
                    await self.call(lambda: self.engine.drop_agents.remote(agents, route=Route(rank=source)))
                except Exception as exc:  # moved all the same; the source evicts the leftovers by policy
                    logger.warning("replica %d kept the KV of %d moved agents: %s", source, len(batch), exc)
        return report

    async def rebalance(self) -> MoveReport:
        """Take every agent's state home (see plan_rebalance)."""
        async with self.lock:
            ranks = list(self.view().live_ranks)
            moves = plan_rebalance(await self.held(ranks), self.view().placement, ranks)
            report = await self.move(moves) if moves else MoveReport()
            if moves:
                logger.info("rebalance over replicas %s: %s", ranks, report.as_dict())
            return report

    def watch(self, period_s: float = 1.0, settle_s: float = 2.0) -> None:
        """In the background, whenever replicas join (and for those this ingress finds when it
        starts): share the registry with them, then rebalance. Once; from the event loop."""
        if self.task is None:
            self.task = asyncio.ensure_future(self._watch(period_s, settle_s))

    async def _watch(self, period_s: float, settle_s: float) -> None:
        seen: set[int] = set()  # the live replicas at the last look (one that died and returns joins again)
        while True:
            await asyncio.sleep(period_s)
            ranks = set(self.view().live_ranks)
            if not ranks - seen:
                seen = ranks
                continue
            await asyncio.sleep(settle_s)  # a scale-up brings its replicas one by one
            ranks = set(self.view().live_ranks)
            joined, seen = sorted(ranks - seen), ranks
            try:
                shared = await self.share_registry(joined)
                report = await self.rebalance()
                logger.info("replicas %s joined: %d agents registered there, %d moved", joined, shared["added"],
                            report.moved)
            except Exception as exc:
                logger.warning("replicas %s joined; sharing the registry or rebalancing failed: %s", joined, exc)

    async def share_registry(self, joined: list[int]) -> dict:
        """Register at each joined replica the agents any live replica knows (every replica knows
        every registered agent; one that joins later knew none of them)."""
        ranks = list(self.view().live_ranks)
        answers = await asyncio.gather(*(self.call(lambda r=r: self.engine.registrations.remote(route=Route(rank=r)))
                                         for r in ranks), return_exceptions=True)
        records = list({rec.agent_id: rec for a in answers if isinstance(a, list) for rec in a}.values())
        if not records:
            return {"added": 0, "failed": 0}
        answers = await asyncio.gather(*(self.call(lambda r=r: self.engine.register_missing.remote(
            records, route=Route(rank=r))) for r in joined), return_exceptions=True)
        done = [a for a in answers if isinstance(a, dict)]
        return {"added": sum(a["added"] for a in done), "failed": sum(a["failed"] for a in done) + len(answers) - len(done)}

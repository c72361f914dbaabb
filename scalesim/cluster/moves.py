"""Planned moves: an agent's KV state goes to another replica before its requests do.

A move of agents from replica S to replica T (run by the ingress, one batch of agents at a time):
1. S exports each agent's KV nodes as the disk tier's self-verifying files (memory/agent_kv.py);
2. T verifies them, stores them in its disk tier and attaches them to its radix tree, owned by
   the agent, so that a hint about the agent prefetches them;
3. the routing flips for the agents whose every page arrived: this ingress places them on T
   (a slot pin or unpin changes the slot table after all its agents were copied: a new epoch,
   read by every ingress replica within a second);
4. S drops what only those agents used (pages a running request holds, or that a waiting one
   has loaded, stay and are evicted later by policy).
A request that reaches S between 1 and 3 extends the agent's history on S only; T recomputes
that last turn. An agent whose copy failed, or whose pages found no place at T, stays routed to
S with its state (a slot pin routes the slot to T all the same; such agents recompute there).

`plan_rebalance` lists the moves that take every agent's state home (its slot's owner, or the
replica it spilled to), far-future agents first: those are the least likely to be called while
they move. When a replica joins (a scale-up, or a restarted replica whose agents were served by
others meanwhile) the ingress registers at it the agents another replica knows, then runs a
rebalance; `POST /v1/rebalance` runs one too. A replica removed by a scale-down persists its
tiers to its state folder as it stops: once Serve runs as many replicas as the router sees and
starts none (so no replica is on its way back to its folder), every live replica takes in the
folders on its node that no live replica holds (adopt) and a rebalance takes each agent home.
What a removed replica persists is what it writes within Serve's graceful shutdown timeout
(launch.py sets 60 s) and its disk budget.
"""

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from scalesim.cluster.engine_status import settled_at
from scalesim.cluster.placement import AffinePlacement, SlotTable, slot_of
from scalesim.cluster.router import Route, RoutingView

logger = logging.getLogger(__name__)
BATCH_AGENTS = 16  # agents per export/import call
BATCH_NBYTES = 256 * 2**20  # and at most about this many bytes of KV (the files pass through the ingress)


@dataclass(frozen=True)
class Move:
    agent_id: str
    source: int
    target: int
    distance: float  # steps until the agent's next call as the source sees it (inf: unknown)
    nbytes: int  # KV bytes only this agent uses on the source


def far_future_first(move: Move) -> tuple:
    return (-move.distance, move.agent_id)


def _moves_of(held: dict[int, dict[str, dict]], target_of: Callable[[str], int | None]) -> list[Move]:
    """A move for each agent held on a replica other than `target_of(agent)` (None: stays), far-future first."""
    moves = []
    for rank, agents in held.items():
        for agent, info in agents.items():
            target = target_of(agent)
            if target is not None and target != rank:
                distance = info.get("distance")
                distance_steps = math.inf if distance is None else float(distance)
                moves.append(Move(agent, rank, target, distance_steps, info["nbytes"]))
    return sorted(moves, key=far_future_first)


def plan_rebalance(held: dict[int, dict[str, dict]], placement: AffinePlacement, live_ranks: list[int]) -> list[Move]:
    """The moves that take each agent's state, on replica `rank` per `held[rank]` (agent ->
    {nbytes, distance}), to its home replica; far-future agents first."""
    return _moves_of(held, lambda agent: placement.home(agent, live_ranks))


def plan_slot_move(held: dict[int, dict[str, dict]], slot: int, target: int, num_slots: int) -> list[Move]:
    """The moves that take the state of `slot`'s agents to `target`; far-future agents first."""
    return _moves_of(held, lambda agent: target if slot_of(agent, num_slots) == slot else None)


def batches(moves: list[Move]) -> list[list[Move]]:
    """`moves` in batches of one source and target, at most BATCH_AGENTS agents and about
    BATCH_NBYTES each, in the order of each batch's first move."""
    out: list[list[Move]] = []
    open_batch: dict[tuple[int, int], list[Move]] = {}
    for move in moves:
        pair = (move.source, move.target)
        batch = open_batch.get(pair)
        if batch is None or len(batch) >= BATCH_AGENTS or sum(m.nbytes for m in batch) + move.nbytes > BATCH_NBYTES:
            batch = open_batch[pair] = []
            out.append(batch)
        batch.append(move)
    return out


@dataclass
class MoveReport:
    moved: int = 0  # agents whose state reached the target and whose requests go there now
    failed: int = 0  # agents left where they were, state and routing (a step failed, or pages did not fit)
    nbytes: int = 0  # bytes of the files the targets stored
    attached: int = 0  # KV nodes the targets attached
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"moved": self.moved, "failed": self.failed, "nbytes": self.nbytes, "attached": self.attached,
                "errors": self.errors[:10]}


class Mover:
    """Runs moves through the engine deployment's handle, one batch of agents at a time, one
    planned change at a time in this ingress. `call(make_call)` makes a handle call under a
    request id of its own (ingress.alone)."""

    def __init__(self, engine, view: Callable[[], RoutingView],
                 call: Callable[[Callable[[], Awaitable]], Awaitable]) -> None:
        self.engine = engine
        self.view = view
        self.call = call
        self.lock = asyncio.Lock()
        # held while the registry is copied to joined replicas and while an agent is deleted
        # (`deleting`): a delete between the copy's snapshot and its registrations would bring
        # the agent back
        self.registry_lock = asyncio.Lock()
        self.task: asyncio.Task | None = None

    async def held(self, ranks: list[int]) -> dict[int, dict[str, dict]]:
        """Each live replica's agents with KV of their own there (a replica that fails to answer is left out)."""
        answers = await asyncio.gather(*(self.call(lambda r=r: self.engine.agents_with_kv.remote(route=Route(rank=r)))
                                         for r in ranks), return_exceptions=True)
        return {r: a for r, a in zip(ranks, answers) if isinstance(a, dict)}

    async def _copy(self, batch: list[Move], report: MoveReport) -> list[Move]:
        """Export the batch's agents at their source and import them at their target; the moves
        whose every page arrived (only those may flip and be dropped at the source)."""
        source, target, agents = batch[0].source, batch[0].target, [m.agent_id for m in batch]
        try:
            files = await self.call(lambda: self.engine.export_agents.remote(agents, route=Route(rank=source)))
            results = await self.call(lambda: self.engine.import_agents.remote(files, route=Route(rank=target)))
        except Exception as exc:
            logger.warning("moving %d agents from replica %d to %d failed: %s", len(batch), source, target, exc)
            report.failed += len(batch)
            report.errors.append(f"{source}->{target}: {exc}")
            return []
        done = [m for m in batch if results[m.agent_id]["complete"]]
        left = [m.agent_id for m in batch if not results[m.agent_id]["complete"]]
        if left:
            report.errors.append(f"{source}->{target}: pages of {left[:5]} found no place (see import_agent_kv); "
                                 "they stay")
        report.failed += len(left)
        report.nbytes += sum(r["nbytes"] for r in results.values())
        report.attached += sum(r["attached"] for r in results.values())
        return done

    async def _flipped(self, done: list[Move], report: MoveReport) -> None:
        """The routing of `done` has flipped: count them, then drop their state at the sources."""
        view = self.view()
        report.moved += len(done)
        view.moves += len(done)
        view.moved_nbytes += sum(m.nbytes for m in done)
        for source in sorted({m.source for m in done}):
            agents = [m.agent_id for m in done if m.source == source]
            try:
                await self.call(lambda: self.engine.drop_agents.remote(agents, route=Route(rank=source)))
            except Exception as exc:  # moved all the same; the source evicts the leftovers by policy
                logger.warning("replica %d kept the KV of %d moved agents: %s", source, len(agents), exc)

    async def rebalance(self) -> MoveReport:
        """Take every agent's state home (see plan_rebalance); each batch flips on its own."""
        report = MoveReport()
        if self.view().routing != "affine":
            report.errors.append(f"nothing to rebalance under {self.view().routing} routing")
            return report
        async with self.lock:
            ranks = list(self.view().live_ranks)
            for batch in batches(plan_rebalance(await self.held(ranks), self.view().placement, ranks)):
                done = await self._copy(batch, report)
                placement = self.view().placement
                for move in done:  # an agent that spilled stays a spilled one (a rebalance leaves it there)
                    placed = placement.placed.get(move.agent_id)
                    placement.place(move.agent_id, move.target,
                                    spilled=placed is not None and placed.spilled and placed.rank == move.target)
                await self._flipped(done, report)
            if report.moved or report.failed:
                logger.info("rebalance over replicas %s: %s", ranks, report.as_dict())
            return report

    async def move_slot(self, slot: int, target: int, change_table: Callable[[], Awaitable[SlotTable]]
                        ) -> tuple[SlotTable, MoveReport]:
        """Copy the state of `slot`'s agents to `target`, then `change_table()` (a pin or unpin:
        a new epoch, the whole slot routed to `target`), then drop what arrived at the sources.
        The table changes even where some state could not move: those agents recompute there."""
        report = MoveReport()
        async with self.lock:
            ranks = list(self.view().live_ranks)
            moves = plan_slot_move(await self.held(ranks), slot, target, self.view().placement.table.num_slots)
            done = [m for batch in batches(moves) for m in await self._copy(batch, report)]
            table = await change_table()
            for move in done:
                self.view().placement.place(move.agent_id, target)
            await self._flipped(done, report)
            return table, report

    def watch(self, period_s: float = 1.0, settle_s: float = 2.0) -> None:
        """In the background, whenever replicas join (and for those this ingress finds when it
        starts): share the registry with them, then rebalance; whenever the replicas change and
        Serve has settled: take in what removed replicas left. Once; from the event loop."""
        if self.task is None:
            self.task = asyncio.ensure_future(self._watch(period_s, settle_s))

    async def _watch(self, period_s: float, settle_s: float) -> None:
        seen: set[int] = set()  # the live replicas at the last look (one that died and returns joins again)
        adopt_pending = False  # folders of removed replicas may wait to be taken in
        while True:
            await asyncio.sleep(period_s)
            ranks = set(self.view().live_ranks)
            if ranks - seen:
                await asyncio.sleep(settle_s)  # a scale-up brings its replicas one by one
                ranks = set(self.view().live_ranks)
                await self._joined(sorted(ranks - seen))
            adopt_pending |= ranks != seen
            seen = ranks
            if adopt_pending and ranks and await self._settled(len(ranks)):
                adopt_pending = not await self._adopt(sorted(ranks))

    @staticmethod
    async def _settled(live_replicas: int) -> bool:
        try:
            return await asyncio.to_thread(settled_at, live_replicas)
        except Exception as exc:  # the controller is busy or restarting: ask again at the next look
            logger.info("serve status failed: %s", exc)
            return False

    async def _joined(self, joined: list[int]) -> None:
        try:
            shared = await self.share_registry(joined)
            report = await self.rebalance()
            logger.info("replicas %s joined: %d agents registered there, %d moved", joined, shared["added"],
                        report.moved)
        except Exception as exc:
            logger.warning("replicas %s joined; sharing the registry or rebalancing failed: %s", joined, exc)

    async def _adopt(self, live_ranks: list[int]) -> bool:
        """Every live replica takes in what removed replicas left in the state folders on its node
        (a folder's lock lets one replica have it), then a rebalance takes each agent home; False
        to try again later (a folder was held by a live process)."""
        answers = await asyncio.gather(*(self.call(lambda r=r: self.engine.adopt_orphans.remote(
            live_ranks, route=Route(rank=r))) for r in live_ranks), return_exceptions=True)
        results = [a for a in answers if isinstance(a, dict)]
        for failure in (a for a in answers if not isinstance(a, dict)):
            logger.warning("taking in the state of removed replicas failed: %s", failure)
        self.view().adopted_nbytes += sum(r["nbytes"] for r in results)
        if any(r["files"] for r in results):
            logger.info("took in %d files (%d bytes) left by removed replicas",
                        sum(r["attached"] + r["present"] for r in results), sum(r["nbytes"] for r in results))
            await self.rebalance()
        return len(results) == len(answers) and not any(r["held"] for r in results)

    def deleting(self) -> asyncio.Lock:
        """`async with mover.deleting():` around deleting an agent from the replicas."""
        return self.registry_lock

    async def share_registry(self, joined: list[int]) -> dict:
        """Register at each joined replica the agents any live replica knows (every replica knows
        every registered agent; one that joins later knew none of them)."""
        async with self.registry_lock:
            ranks = list(self.view().live_ranks)
            answers = await asyncio.gather(*(self.call(lambda r=r: self.engine.registrations.remote(
                route=Route(rank=r))) for r in ranks), return_exceptions=True)
            records = list({rec.agent_id: rec for a in answers if isinstance(a, list) for rec in a}.values())
            if not records:
                return {"added": 0, "failed": 0}
            answers = await asyncio.gather(*(self.call(lambda r=r: self.engine.register_missing.remote(
                records, route=Route(rank=r))) for r in joined), return_exceptions=True)
        done = [a for a in answers if isinstance(a, dict)]
        failed = sum(a["failed"] for a in done) + len(answers) - len(done)
        return {"added": sum(a["added"] for a in done), "failed": failed}

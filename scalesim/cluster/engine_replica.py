"""One engine replica of the Ray Serve app: a whole ScaleSim server (engine, tiers, registry)
behind a Serve deployment, reached only through the ingress.

Each replica keeps its state under `<disk-dir>/replica-<rank>`: its disk tier and its agent
registry. With a `--disk-dir`, the rank it publishes to routers is the number of the folder it
claimed as it started (state_folders.py): a replica Serve restarted after a crash finds its
folder, its disk-tier state and its registered agents again, and on one node the ranks stay
0..n-1 through rolling updates, whatever numbers Serve gave replicas meanwhile. Without one it
publishes its Serve rank. A replica removed by a scale-down persists its tiers to its
folder as it stops (`__del__`); a live replica takes the folder in (`adopt_orphans`, driven by the
ingress: moves.py). The ingress checks the Host header and the API key; a replica accepts what
the ingress relays.
"""

import argparse
import asyncio
import copy
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from ray import serve

from scalesim.cluster.asgi_relay import REPLICA_HEADER, RelayHead, RelayRequest, run_asgi
from scalesim.cluster.placement import SlotTable
from scalesim.cluster.router import Route
from scalesim.cluster.state_folders import claim_state_folder, claimed
from scalesim.memory import agent_kv
from scalesim.memory.disk_store import StateDirInUseError
from scalesim.server.agent_routes import hint_agents
from scalesim.server.agent_store import AgentRecord

logger = logging.getLogger(__name__)


class EngineReplica:
    async def __init__(self, args: argparse.Namespace, engine_args: dict) -> None:
        from scalesim.server.serve import build_server

        context = serve.get_replica_context()
        self.base_disk_dir = args.disk_dir
        self.claim = await asyncio.to_thread(claim_state_folder, args.disk_dir, context.rank.rank, context.world_size)
        self.rank, self.disk_dir = self.claim.rank, self.claim.folder
        if self.rank != context.rank.rank:
            logger.info("Serve rank %d of %d: this replica took state folder %s and publishes rank %d",
                        context.rank.rank, context.world_size, self.disk_dir, self.rank)
        args = copy.copy(args)
        args.disk_dir, args.api_key, args.allowed_hosts = self.disk_dir, None, ["*"]
        try:
            self.app = build_server(args, {**engine_args, "disk_dir": self.disk_dir})
        except BaseException:
            self.claim.release()
            raise
        self.state = self.app.state.scalesim
        # every agent is registered everywhere:
        ranks = list(range(max(context.world_size, self.rank + 1)))
        self.state.prefills_on_restore = lambda agent: SlotTable().order(agent, ranks)[0] == self.rank  # pre-fill ours
        self.lifespan = self.app.router.lifespan_context(self.app)
        await self.lifespan.__aenter__()  # restores the registry's agents, pre-fills their personas

    def record_replica_metadata(self) -> dict:
        """What routers learn about this replica: its rank, which owns slots."""
        return {"rank": self.rank}

    async def relay(self, request: RelayRequest, route: Route) -> AsyncIterator[RelayHead | bytes]:
        """Run one HTTP request through this replica's app; the head names the replica.
        (`route` is read by the router, which sent the request here.)"""
        async for item in run_asgi(self.app, request):
            if isinstance(item, RelayHead):
                item.headers.append((REPLICA_HEADER.encode(), str(self.rank).encode()))
            yield item

    async def hint(self, step: int | None, distances: dict[str, float], schedule: dict[str, float],
                   route: Route | None = None) -> dict:
        """This replica's share of a hint, as distances (and absolute schedule steps) per agent;
        advances its step to `step` even when the share is empty. Validated by the ingress."""
        fields = {"distances": distances, **({"schedule": schedule} if schedule else {})}
        result = await asyncio.to_thread(hint_agents, self.state, step, fields)
        return {**result, "replica": self.rank}

    # --- planned moves (cluster/moves.py): an agent's KV goes to another replica --------------
    async def agents_with_kv(self, route: Route | None = None) -> dict[str, dict]:
        """Agent -> {nbytes, distance} of the KV only it uses here."""
        self._meant_for_me(route)
        return await asyncio.to_thread(agent_kv.agents_with_kv, self.kv_objects)

    async def export_agents(self, agents: list[str], route: Route | None = None) -> dict[str, list[bytes]]:
        """Each agent's KV as self-verifying files (see memory/agent_kv.py)."""
        self._meant_for_me(route)
        return {a: await asyncio.to_thread(agent_kv.export_agent_kv, self.kv_objects, a) for a in agents}

    async def import_agents(self, files: dict[str, list[bytes]], route: Route | None = None) -> dict[str, dict]:
        """Store and attach each agent's files; agent -> its ImportResult and whether it is complete."""
        self._meant_for_me(route)
        results = {}
        for agent, agent_files in files.items():
            result = await asyncio.to_thread(agent_kv.import_agent_kv, self.kv_objects, agent, agent_files)
            results[agent] = {**dataclasses.asdict(result), "complete": result.complete}
        return results

    async def drop_agents(self, agents: list[str], route: Route | None = None) -> dict:
        """Forget the KV only these agents use here (the old owner's side of a move)."""
        self._meant_for_me(route)
        results = [await asyncio.to_thread(agent_kv.drop_agent_kv, self.kv_objects, a) for a in agents]
        return {"dropped": sum(r[0] for r in results), "kept": sum(r[1] for r in results)}

    async def adopt_orphans(self, live_ranks: list[int], route: Route | None = None) -> dict:
        """Take in the KV that removed replicas left in their state folders on this node: every
        `replica-<k>` folder with k not in `live_ranks` (see agent_kv.adopt_state_dir). The
        summed ImportResult, and `held`: folders a live process still holds (tried again later)."""
        self._meant_for_me(route)

        def adopt() -> dict:
            total, held = agent_kv.ImportResult(), 0
            for folder in sorted(Path(self.base_disk_dir).glob("replica-*")) if self.base_disk_dir else ():
                rank = folder.name.removeprefix("replica-")
                if not rank.isdigit() or int(rank) in live_ranks or folder == self.disk_dir:
                    continue
                with claimed(folder) as ours:  # a replica starting there waits until the files are taken in
                    if not ours:
                        held += 1
                        continue
                    try:
                        result = agent_kv.adopt_state_dir(self.kv_objects, folder)
                    except StateDirInUseError:
                        held += 1
                        continue
                total.add(result)
            return {**dataclasses.asdict(total), "held": held}

        return await asyncio.to_thread(adopt)

    # --- the registry of a replica that joins later ---------------------------------------------
    async def registrations(self, route: Route | None = None) -> list[AgentRecord]:
        """Every agent registered here."""
        self._meant_for_me(route)
        return await asyncio.to_thread(self.state.agents.all)

    async def register_missing(self, records: list[AgentRecord], route: Route | None = None) -> dict:
        """Register (without pre-filling) the agents of `records` this replica does not know;
        how many were added and how many failed (an adapter folder missing on this node)."""
        self._meant_for_me(route)

        def register() -> dict:
            added = failed = 0
            for record in records:
                if self.state.agents.get(record.agent_id) is not None:
                    continue
                try:
                    self.state.register(record)
                    added += 1
                except Exception as exc:
                    logger.warning("agent %s not registered on replica %d: %s", record.agent_id, self.rank, exc)
                    failed += 1
            return {"added": added, "failed": failed}

        return await asyncio.to_thread(register)

    def _meant_for_me(self, route: Route | None) -> None:
        """A move's step must run on the replica it names: the router sends a call whose replica
        is gone to any other, which would move the wrong replica's state."""
        rank = getattr(route, "rank", None)  # by its field: Serve may ship the ingress's Route class by value
        if rank is not None and rank != self.rank:
            raise RuntimeError(f"replica {rank} is gone; replica {self.rank} answered")

    @property
    def kv_objects(self) -> agent_kv.KVObjects:
        return self.state.llm.engine.kv_objects

    def describe(self, route: Route | None = None) -> dict:
        """Rank, process, state folder, agents and queue of this replica (for /v1/replicas)."""
        stats = self.state.llm.stats()
        return {"rank": self.rank, "pid": os.getpid(), "disk_dir": str(self.disk_dir) if self.disk_dir else None,
                "agents": len(self.state.llm.engine.agents), "running": stats["running"], "waiting": stats["waiting"]}

    async def __del__(self) -> None:
        await self.lifespan.__aexit__(None, None, None)  # persists the tiers when configured, releases the disk dir
        self.claim.release()

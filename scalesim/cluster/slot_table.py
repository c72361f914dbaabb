"""The slot table: which slots are pinned to which replica, with an epoch; one shared copy.

`SlotTableActor` is a Serve deployment-scoped actor of the ingress deployment: every ingress
replica reads the same one. Serve recreates it if it dies, empty (pins are an operator's choice,
not state to keep); a new `incarnation` tells readers that its epochs started again.
`SlotTableReader` is the ingress's side: it reads the actor in the background, at most once a
second, keeps the last table it read while the actor is away, and routes with the overrides over
rendezvous hashing (placement.SlotTable).
"""

import asyncio
import logging
import uuid

from scalesim.cluster.placement import SlotTable

SLOT_TABLE_ACTOR = "slot_table"  # its name among the ingress deployment's deployment-scoped actors
REFRESH_S = 1.0

logger = logging.getLogger(__name__)


class SlotTableActor:
    def __init__(self) -> None:
        self.incarnation = uuid.uuid4().hex
        self.overrides: dict[int, int] = {}
        self.epoch = 0

    def snapshot(self) -> tuple[str, int, dict[int, int]]:
        """(incarnation, epoch, slot -> rank overrides)."""
        return self.incarnation, self.epoch, dict(self.overrides)

    def pin(self, slot: int, rank: int) -> int:
        """Route `slot` to replica `rank` while it lives; returns the new epoch."""
        self.overrides[slot] = rank
        self.epoch += 1
        return self.epoch

    def unpin(self, slot: int) -> int:
        """Back to rendezvous hashing for `slot`; returns the new epoch."""
        self.overrides.pop(slot, None)
        self.epoch += 1
        return self.epoch


class SlotTableReader:
    """Keeps `install(table)` fed with the actor's table: on start-up, every REFRESH_S, and at
    once after a change made through this reader."""

    def __init__(self, install) -> None:
        self.install = install
        self.seen: tuple[str, int] | None = None
        self.task: asyncio.Task | None = None
        self.handle = None  # the actor's handle, looked up once (again after a failed read: Serve may recreate it)

    async def _actor(self):
        if self.handle is None:
            from ray import serve
            from starlette.concurrency import run_in_threadpool

            self.handle = await run_in_threadpool(serve.get_deployment_actor, SLOT_TABLE_ACTOR)  # a blocking lookup
        return self.handle

    async def read(self, num_slots: int) -> SlotTable:
        """Read the actor now and install its table if it changed; the table read."""
        incarnation, epoch, overrides = await (await self._actor()).snapshot.remote()
        table = SlotTable(num_slots, overrides, epoch)
        if self.seen != (incarnation, epoch):
            self.seen = (incarnation, epoch)
            self.install(table)
        return table

    def start(self, num_slots: int) -> None:
        """Start the background refresh (once; from a request, on the ingress's event loop)."""
        if self.task is None:
            self.task = asyncio.ensure_future(self._refresh(num_slots))

    async def _refresh(self, num_slots: int) -> None:
        while True:
            try:
                await self.read(num_slots)
            except Exception as exc:  # recreated by Serve, or not up yet: keep routing with the last table
                logger.debug("slot table not read: %s", exc)
                self.handle = None
            await asyncio.sleep(REFRESH_S)

    async def pin(self, slot: int, rank: int, num_slots: int) -> SlotTable:
        await (await self._actor()).pin.remote(slot, rank)
        return await self.read(num_slots)

    async def unpin(self, slot: int, num_slots: int) -> SlotTable:
        await (await self._actor()).unpin.remote(slot)
        return await self.read(num_slots)

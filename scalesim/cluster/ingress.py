"""The ingress of the Ray Serve app: the same OpenAI and ScaleSim API, in front of engine replicas.

Every request is relayed to one engine replica through the engine deployment's handle, with a
`Route` that the agent-affine router reads:
- completions and chat: the agent the request names (body `agent_id`, `user`, `X-Agent-Id`,
  `model@agent`), else the one inferred from its prompt's private part (the inferred id is sent
  on as `X-Agent-Id`, so the replica records the same agent);
- `POST /v1/agents`: registered at the agent's owner (which pre-fills its persona), then at every
  other live replica without pre-filling; `GET /v1/agents/{id}` asks the owner and says which
  replica it is; `DELETE` removes the agent everywhere;
- `/v1/hints` and `/v1/update`: parsed here, turned into per-agent distances, split by where each
  agent's state is, and sent in one call per live replica (each replica also advances its step);
- `/metrics`: every replica's series labelled `replica="<rank>"`, and the routing counters;
- `/v1/replicas`: each live replica's rank, process and queue; `/v1/slots`: the slot table,
  where pinning or unpinning a slot moves its agents' state first (moves.py);
- `POST /v1/rebalance`: move every agent's state home; also run when a replica joins;
- anything else (models, embeddings, health): the replica with the shortest queue.
A replica that dies before it answers is retried: the router sends the retry to the agent's
next-ranked replica until Serve has restarted the dead one under the same rank.
"""

import asyncio
import dataclasses
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest
from ray import serve
from ray.exceptions import ActorDiedError
from ray.serve.handle import DeploymentHandle

from scalesim.cluster.asgi_relay import RelayHead, RelayRequest
from scalesim.cluster.cluster_metrics import RoutingCollector, merge_replica_metrics
from scalesim.cluster.engine_status import engine_replica_states
from scalesim.cluster.moves import Mover
from scalesim.cluster.placement import SlotTable, slot_of
from scalesim.cluster.router import Route, RoutingView, shared_view
from scalesim.cluster.slot_table import SlotTableReader
from scalesim.distance.hints import estimate_distances
from scalesim.server.agent_routes import MAX_HINT_STEP, parse_hint_batch
from scalesim.server.app import BodySizeLimit, Gate
from scalesim.server.config import ServerConfig
from scalesim.server.errors import APIError, error_body, install_error_handlers
from scalesim.server.identity import AGENT_ID_HEADER, message_texts, resolve_identity
from scalesim.server.private_spans import PrivateSpans
from scalesim.server.protocol import PaperUpdate
from scalesim.server.sse import DONE, event

logger = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)  # a dead replica: about 16 s for Serve to notice and reroute
WARM_UP_S, RANKS_POLL_S = 5.0, 0.1
HOP_BY_HOP = {b"connection", b"transfer-encoding", b"keep-alive", b"content-length"}  # re-framed by the proxy


async def alone(make_call: Callable[[], Awaitable[T]]) -> T:
    """Make and await a handle call under an internal request id of its own. Serve
    copies the id of the HTTP request being served into every handle call made while serving it,
    and its router matches a routing decision to the pending request by that id: two concurrent
    calls from one request (hints fanned out to two replicas) would share an id, and one of them
    would never be sent. Only concurrent fan-out calls use this: a single call keeps the request's
    id, so that Serve cancels it when the client leaves."""
    from ray.serve import context

    current = context._get_serve_request_context()
    context._serve_request_context.set(dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex))
    return await make_call()  # made here: `.remote()` takes the id from the context it is called in


def _agent_of_completion(body: dict, header: str | None, spans: PrivateSpans | None) -> tuple[str | None, bool]:
    """(agent id, inferred) for a chat or completion body, as the replica would resolve it."""
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    named = [v if isinstance(v, str) else None for v in (body.get("agent_id"), body.get("user"))]
    identity = resolve_identity(model, named[0], named[1], header)
    if identity.agent_id is not None:
        return identity.agent_id, False
    messages, prompt = body.get("messages"), body.get("prompt")
    texts = message_texts([m for m in messages if isinstance(m, dict)]) if isinstance(messages, list) \
        else [("prompt", prompt)] if isinstance(prompt, str) else []
    identity.infer(spans, texts)
    return identity.agent_id, identity.agent_id is not None


def split_by_target(view: RoutingView, ranks: list[int], distances: dict[str, float],
                    schedule: dict[str, float]) -> dict[int, tuple[dict, dict]]:
    """Each live replica's share of a hint: the agents whose state it holds."""
    shares: dict[int, tuple[dict, dict]] = {rank: ({}, {}) for rank in ranks}
    for part, source in enumerate((distances, schedule)):
        for agent, value in source.items():
            shares[view.placement.target(agent, ranks)][part][agent] = value
            view.misrouted_hints += view.owner_is_down(agent)
    return shares


@serve.ingress()
class Ingress:
    def __init__(self, engine: DeploymentHandle, config: ServerConfig) -> None:
        """Its arguments do not depend on the replica count: scaling the engine deployment keeps
        the ingress (and its memory of where each agent's state is)."""
        self.engine = engine
        self.warm = False
        self.config = config
        self.spans = PrivateSpans() if config.infer_agents else None
        self.slot_table = SlotTableReader(self._install_table)
        self.mover = Mover(engine, shared_view, alone)
        self.registry = CollectorRegistry()
        self.registry.register(RoutingCollector())
        self.requests = Counter("scalesim_ingress_requests", "HTTP requests at the ingress by route and status",
                                ["route", "status"], registry=self.registry)  # what Gate counts

    def __serve_build_asgi_app__(self) -> FastAPI:
        app = FastAPI(title="ScaleSim (Ray Serve)")
        install_error_handlers(app)
        app.post("/v1/chat/completions")(self.completion)
        app.post("/v1/completions")(self.completion)
        app.post("/v1/hints")(self.hints)
        app.post("/v1/update")(self.paper_update)
        app.post("/v1/agents")(self.create_agent)
        app.api_route("/v1/agents/{agent_id:path}", methods=["GET", "DELETE"])(self.agent)
        app.get("/v1/replicas")(self.replicas)
        app.get("/v1/slots")(self.slots)
        app.post("/v1/slots")(self.pin_slot)
        app.delete("/v1/slots/{slot}")(self.unpin_slot)
        app.post("/v1/rebalance")(self.rebalance)
        app.get("/metrics")(self.metrics)
        app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])(self.anywhere)
        app.add_middleware(Gate, config=self.config, metrics=self)
        app.add_middleware(BodySizeLimit, max_nbytes=self.config.max_body_nbytes)
        return app

    @property
    def view(self) -> RoutingView:
        """The engine router's view of the replicas and its counters (see router.shared_view)."""
        return shared_view()

    def _install_table(self, table: SlotTable) -> None:
        placement = self.view.placement
        old, new = placement.table.overrides, table.overrides
        placement.table = table
        placement.follow_pins({s for s in set(old) | set(new) if old.get(s) != new.get(s)})

    async def _warm_up(self) -> None:
        """Once, before the first request is routed: the handle builds its router on its first
        call and learns of the replicas one by one, so make a call and wait (briefly) until it
        knows as many as Serve runs; else the first agents would be placed over too few."""
        if self.warm:
            return
        self.slot_table.start(self.view.placement.table.num_slots)
        self.mover.watch()
        try:
            await asyncio.wait_for(self.engine.describe.remote(route=Route()), WARM_UP_S)
        except asyncio.TimeoutError:
            raise APIError(503, "no engine replica is up") from None
        try:
            running = (await run_in_threadpool(engine_replica_states))[1].get("RUNNING", 1)
        except Exception as exc:  # the controller is busy: route with the replicas known so far
            logger.warning("serve status failed (%s); not waiting for the router to know every replica", exc)
            running = 1
        for _ in range(int(WARM_UP_S / RANKS_POLL_S)):
            if len(self.view.live_ranks) >= running:
                break
            await asyncio.sleep(RANKS_POLL_S)
        self.warm = True

    async def _live_ranks(self) -> list[int]:
        """The live replicas' ranks."""
        await self._warm_up()
        if not self.view.live_ranks:
            raise APIError(503, "no engine replica is up")
        return list(self.view.live_ranks)

    # --- relaying ------------------------------------------------------------------------------
    async def _relay(self, request: Request, route: Route, body: bytes | None = None,
                     headers: dict[bytes, bytes] | None = None, path: str | None = None,
                     query: bytes | None = None) -> tuple[RelayHead, object]:
        """Send the request (with `body`, `headers`, `path` and `query` replaced where given) to
        the replica the router picks; the response head and the rest of the response stream. A
        replica that has died before its head arrived is retried (it ran nothing for us then)."""
        self.slot_table.start(self.view.placement.table.num_slots)
        body = await request.body() if body is None else body
        replaced = {**(headers or {}), b"content-length": str(len(body)).encode()}
        raw = [(k, v) for k, v in request.headers.raw if k not in replaced] + list(replaced.items())
        relayed = RelayRequest(request.method, path or request.url.path,
                               request.url.query.encode() if query is None else query, raw, body)
        for delay_s in (*RETRY_DELAYS_S, None):
            stream = self.engine.options(stream=True).relay.remote(relayed, route=route)
            try:
                return await stream.__anext__(), stream
            except ActorDiedError as exc:
                stream.cancel()
                if delay_s is None:
                    raise APIError(503, f"no engine replica could take the request: {exc}") from exc
                logger.warning("an engine replica died; retrying in %.1f s", delay_s)
                await asyncio.sleep(delay_s)
            except BaseException:  # the client left (cancelled), or the call failed: stop the replica's work
                stream.cancel()
                raise

    async def _forward(self, request: Request, route: Route, **kwargs) -> Response:
        head, stream = await self._relay(request, route, **kwargs)

        server_sent_events = any(k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                                 for k, v in head.headers)

        async def body():
            try:
                async for chunk in stream:
                    yield chunk
            except Exception as exc:  # the replica died mid-answer; the 200 is sent already
                if not server_sent_events:
                    raise
                yield (event(error_body(502, f"the engine replica failed mid-answer: {exc}")) + DONE).encode()
            finally:
                stream.cancel()

        response = StreamingResponse(body(), status_code=head.status)
        response.raw_headers = [(k, v) for k, v in head.headers if k.lower() not in HOP_BY_HOP]
        return response

    async def _json_from(self, request: Request, route: Route, **kwargs) -> tuple[int, dict, int]:
        """(status, JSON body, replica rank) of a relayed request whose answer is JSON."""
        head, stream = await self._relay(request, route, **kwargs)
        data = b"".join([chunk async for chunk in stream])
        rank = head.replica if head.replica is not None else -1
        try:
            return head.status, json.loads(data), rank
        except ValueError:
            raise APIError(502, f"engine replica {rank} answered {head.status} with a body that is not JSON")

    # --- routes ----------------------------------------------------------------------------------
    async def completion(self, request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict):  # the replica answers the 4xx
            return await self._forward(request, Route())
        await self._warm_up()
        agent_id, inferred = _agent_of_completion(body, request.headers.get("x-agent-id"), self.spans)
        extra = {AGENT_ID_HEADER.lower().encode(): agent_id.encode()} if inferred and agent_id.isascii() else None
        return await self._forward(request, Route(agent_id=agent_id), headers=extra)

    async def create_agent(self, request: Request) -> Response:
        try:
            agent_id = json.loads(await request.body()).get("id")
        except (ValueError, AttributeError):
            agent_id = None
        if not isinstance(agent_id, str):
            return await self._forward(request, Route())  # the replica answers the 400
        await self._warm_up()
        status, data, rank = await self._json_from(request, Route(agent_id=agent_id))
        if status != 200:
            return JSONResponse(data, status_code=status)
        others = [r for r in await self._live_ranks() if r != rank]
        answers = await asyncio.gather(
            *(alone(lambda r=r: self._json_from(request, Route(rank=r), query=b"prefill=false")) for r in others),
            return_exceptions=True)
        registered = [rank] + [r for r, a in zip(others, answers) if not isinstance(a, BaseException) and a[0] == 200]
        if len(registered) <= len(others):
            logger.warning("agent %s registered on replicas %s of %s", agent_id, registered, [rank, *others])
        return JSONResponse({**data, "replica": rank, "registered_on": sorted(registered)})

    async def agent(self, agent_id: str, request: Request) -> Response:
        await self._live_ranks()  # asked where the agent's state is, not routed as a call (no spill)
        if request.method == "GET":
            status, data, rank = await self._json_from(request, Route(rank=self.view.target(agent_id)))
            return JSONResponse({**data, "replica": rank} if status == 200 else data, status_code=status)
        async with self.mover.deleting():  # not while the registry is copied to a joined replica
            return await self._delete_agent(agent_id, request)

    async def _delete_agent(self, agent_id: str, request: Request) -> Response:
        status, data, rank = await self._json_from(request, Route(rank=self.view.target(agent_id)))
        others = [r for r in await self._live_ranks() if r != rank]
        answers = await asyncio.gather(*(alone(lambda r=r: self._json_from(request, Route(rank=r))) for r in others),
                                       return_exceptions=True)
        if status != 200:  # unknown to its owner: deleted if another replica knew it
            status, data = next(((a[0], a[1]) for a in answers if not isinstance(a, BaseException) and a[0] == 200),
                                (status, data))
        return JSONResponse(data, status_code=status)

    async def hints(self, request: Request) -> Response:
        batch = await run_in_threadpool(parse_hint_batch, await request.body())
        fields = {name: getattr(batch, name) for name in batch.model_fields_set if name != "step"}
        return await self._fan_out_hints(batch.step, fields)

    async def paper_update(self, body: PaperUpdate) -> Response:
        return await self._fan_out_hints(body.timestep_cnt, body.model_dump(exclude={"timestep_cnt"}))

    async def _fan_out_hints(self, step: int | None, fields: dict) -> Response:
        """Per-agent distances computed here (turn orders, graphs and positions relate agents, so
        they cannot be split as they come), then one call per live replica with its agents'
        share; `schedule` stays absolute and goes to each replica with the step."""
        if step is not None and not 0 <= step <= MAX_HINT_STEP:
            raise APIError(400, f"step must be in [0, {MAX_HINT_STEP}]", param="step")
        fields = {k: v for k, v in fields.items() if v is not None}
        schedule = fields.pop("schedule", None) or {}
        try:
            distances = await run_in_threadpool(estimate_distances, 0, **fields) if fields else {}
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise APIError(400, f"bad hint: {exc}")
        results = await self._send_hints(step, distances, schedule)
        totals = {k: sum(r[k] for r in results) for k in ("agents", "changed", "unknown")}
        return JSONResponse({"object": "hint_result", "step": max(r["step"] for r in results), **totals,
                             "agents_by_replica": {str(r["replica"]): r["agents"] for r in results}})

    async def _send_hints(self, step: int | None, distances: dict, schedule: dict) -> list[dict]:
        """One call per live replica with its share. A share whose replica died meanwhile is split
        again over the replicas still live (the router has dropped the dead one by then)."""
        results: list[dict] = []
        for _ in range(len(RETRY_DELAYS_S)):
            shares = await run_in_threadpool(split_by_target, self.view, await self._live_ranks(), distances, schedule)
            answers = await asyncio.gather(
                *(alone(lambda r=r, share=share: self.engine.hint.remote(step, *share, route=Route(rank=r)))
                  for r, share in shares.items()), return_exceptions=True)
            failed = [(r, a) for r, a in zip(shares, answers) if isinstance(a, BaseException)]
            results += [a for a in answers if not isinstance(a, BaseException)]
            if not failed:
                return results
            if not all(isinstance(a, ActorDiedError) for _, a in failed):
                raise next(a for _, a in failed if not isinstance(a, ActorDiedError))
            distances = {k: v for r, _ in failed for k, v in shares[r][0].items()}
            schedule = {k: v for r, _ in failed for k, v in shares[r][1].items()}
            logger.warning("replicas %s died during a hint; its share goes to the others", [r for r, _ in failed])
            await asyncio.sleep(RETRY_DELAYS_S[0])
        raise APIError(503, "engine replicas kept dying while a hint was sent")

    async def replicas(self) -> dict:
        ranks = await self._live_ranks()
        described = await asyncio.gather(
            *(alone(lambda r=r: self.engine.describe.remote(route=Route(rank=r))) for r in ranks),
            return_exceptions=True)
        return {"object": "list",
                "data": [d for r, d in zip(ranks, described) if isinstance(d, dict) and d["rank"] == r]}

    async def metrics(self, request: Request) -> Response:
        ranks = await self._live_ranks()
        scraped = await asyncio.gather(*(alone(lambda rank=rank: self._scrape(request, rank)) for rank in ranks),
                                       return_exceptions=True)
        pages = {rank: text for rank, text in zip(ranks, scraped) if isinstance(text, str)}
        return Response(generate_latest(self.registry) + merge_replica_metrics(pages), media_type=CONTENT_TYPE_LATEST)

    async def _scrape(self, request: Request, rank: int) -> str | None:
        """Replica `rank`'s /metrics page, or None if another replica answered (it had died)."""
        head, stream = await self._relay(request, Route(rank=rank), body=b"")
        text = b"".join([chunk async for chunk in stream]).decode()
        return text if head.replica == rank else None

    # --- the slot table --------------------------------------------------------------------------
    async def slots(self) -> dict:
        """The slot table: its epoch, the pinned slots, and how many slots each live replica owns."""
        ranks = await self._live_ranks()
        table = await self.slot_table.read(self.view.placement.table.num_slots)
        owners = table.owners(ranks)
        return {"object": "slot_table", "epoch": table.epoch, "num_slots": table.num_slots,
                "overrides": {str(k): v for k, v in sorted(table.overrides.items())},
                "slots_by_replica": {str(r): owners.count(r) for r in ranks}}

    async def pin_slot(self, request: Request) -> dict:
        """`{"replica": R, "slot": S}` or `{"replica": R, "agent_id": A}`: move the slot's agents'
        state to R, then route the slot to R (every ingress replica within a second)."""
        try:
            body = json.loads(await request.body())
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("replica"), int):
            raise APIError(400, "give replica (a rank) and slot or agent_id", param="replica")
        ranks, num_slots = await self._live_ranks(), self.view.placement.table.num_slots
        agent_id = body.get("agent_id")
        slot = body.get("slot") if "slot" in body else \
            slot_of(agent_id, num_slots) if isinstance(agent_id, str) else None
        if not isinstance(slot, int) or not 0 <= slot < num_slots:
            raise APIError(400, f"slot must be in [0, {num_slots}), or give agent_id", param="slot")
        if body["replica"] not in ranks:
            raise APIError(400, f"no live replica of rank {body['replica']}; live: {ranks}", param="replica")
        return await self._move_slot(slot, body["replica"])

    async def unpin_slot(self, slot: int) -> dict:
        """Move the slot's agents' state to its rendezvous owner, then route the slot there."""
        return await self._move_slot(slot, None)

    async def _move_slot(self, slot: int, rank: int | None) -> dict:
        """Pin `slot` to `rank` (None: unpin): its agents' state goes to the slot's new replica
        first (moves.Mover.move_slot), then the table changes, then the old replicas drop it."""
        num_slots, ranks = self.view.placement.table.num_slots, await self._live_ranks()
        overrides = {s: r for s, r in self.view.placement.table.overrides.items() if s != slot}
        target = rank if rank is not None else SlotTable(num_slots, overrides).order_of_slot(slot, ranks)[0]
        table, report = await self.mover.move_slot(
            slot, target, lambda: self.slot_table.pin(slot, rank, num_slots) if rank is not None
            else self.slot_table.unpin(slot, num_slots))
        return {"object": "slot", "slot": slot, "replica": rank, "epoch": table.epoch, "moves": report.as_dict()}

    async def rebalance(self) -> dict:
        """Move every agent's state to its home replica now (far-future agents first)."""
        await self._live_ranks()
        return {"object": "rebalance", **(await self.mover.rebalance()).as_dict()}

    async def anywhere(self, path: str, request: Request) -> Response:
        return await self._forward(request, Route())

"""The ingress of the Ray Serve app: the same OpenAI and ScaleSim API, in front of engine replicas.

Every request is relayed to one engine replica through the engine deployment's handle, with a
`Route` that the agent-affine router reads:
- completions and chat: the agent the request names (body `agent_id`, `user`, `X-Agent-Id`,
  `model@agent`), else the one inferred from its prompt's private part (the inferred id is sent
  on as `X-Agent-Id`, so the replica records the same agent);
- `/v1/agents` (POST, GET, DELETE): the agent's owner; GET says which replica holds it;
- `/v1/hints` and `/v1/update`: parsed here, turned into per-agent distances, split by owner and
  sent in one call per live replica (each replica also advances its step);
- `/metrics`: every replica's metrics, labelled `replica="<rank>"`, and the routing counters;
- `/v1/replicas`: each live replica's rank, process and queue;
- anything else (models, embeddings, health): the replica with the shortest queue.
A replica that dies before it answered is retried: the router sends the retry to the agent's
next-ranked replica until Serve has restarted the dead one under the same rank.
"""

import asyncio
import dataclasses
import json
import logging
import re
import uuid

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from scalesim.cluster.asgi_relay import RelayHead, RelayRequest
from scalesim.cluster.router import Route, RoutingView, shared_view
from scalesim.distance.hints import estimate_distances
from scalesim.server.agent_routes import MAX_HINT_STEP, _parse_hints
from scalesim.server.app import BodySizeLimit, Gate
from scalesim.server.config import ServerConfig
from scalesim.server.errors import APIError, install_error_handlers
from scalesim.server.identity import AGENT_ID_HEADER, message_texts, resolve_identity
from scalesim.server.private_spans import PrivateSpans
from scalesim.server.protocol import PaperUpdate

logger = logging.getLogger(__name__)
RETRY_DELAYS_S = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)  # a dead replica: about 16 s for Serve to notice and reroute
RANKS_WAIT_POLLS, RANKS_POLL_S = 50, 0.1
REPLICA_DIED = (ActorDiedError, ActorUnavailableError, RayActorError)
HOP_BY_HOP = {b"connection", b"transfer-encoding", b"keep-alive", b"content-length"}  # re-framed by the proxy
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?( .*)$")


def _agent_of_completion(body: dict, header: str | None, spans: PrivateSpans | None) -> tuple[str | None, bool]:
    """(agent id, inferred) for a chat or completion body, as the replica would resolve it."""
    model = body.get("model") if isinstance(body.get("model"), str) else ""
    named = [v if isinstance(v, str) else None for v in (body.get("agent_id"), body.get("user"))]
    identity = resolve_identity(model, named[0], named[1], header)
    if identity.agent_id is None:
        messages = body.get("messages")
        prompt = body.get("prompt")
        texts = message_texts([m for m in messages if isinstance(m, dict)]) if isinstance(messages, list) \
            else [("prompt", prompt)] if isinstance(prompt, str) else []
        identity.infer(spans, texts)
        return identity.agent_id, identity.agent_id is not None
    return identity.agent_id, False


def _own_request_id() -> None:
    """Give the handle call about to be made an internal request id of its own. Serve copies the
    id of the HTTP request being served into every handle call made while serving it, and its
    router matches a routing decision to the pending request by that id: two concurrent calls
    from one request (hints fanned out to two replicas) then share an id, and one of them is
    never sent. Call this inside each concurrent task (the context is per task)."""
    from ray.serve import context

    current = context._get_serve_request_context()
    context._serve_request_context.set(dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex))


class _RoutingCollector(Collector):
    def __init__(self, misrouted_hints: list[int]) -> None:
        self.misrouted_hints = misrouted_hints

    def collect(self):
        self.view: RoutingView = shared_view()
        requests = CounterMetricFamily("scalesim_routed_requests", "requests sent to each engine replica",
                                       labels=["replica"])
        for rank, count in sorted(self.view.requests_by_rank.items()):
            requests.add_metric([str(rank)], count)
        yield requests
        yield CounterMetricFamily("scalesim_routing_spills", "cold agents sent past an overloaded owner",
                                  value=self.view.spills)
        yield CounterMetricFamily("scalesim_routing_fallbacks", "requests whose agent's owner was down",
                                  value=self.view.fallbacks)
        yield CounterMetricFamily("scalesim_misrouted_hints", "hinted agents whose owner was down when hinted",
                                  value=self.misrouted_hints[0])
        yield GaugeMetricFamily("scalesim_live_replicas", "engine replicas the router can reach",
                                value=len(self.view.live_ranks))


def _label_replica(text: str, rank: int) -> list[str]:
    """A replica's Prometheus samples with `replica="<rank>"` added; its comments dropped."""
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            name, labels, rest = match.groups()
            inner = f'replica="{rank}"' + ("," + labels[1:-1] if labels and labels != "{}" else "")
            out.append(f"{name}{{{inner}}}{rest}")
    return out


@serve.ingress()
class Ingress:
    def __init__(self, engine: DeploymentHandle, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.spans = PrivateSpans() if config.infer_agents else None
        self.misrouted_hints = [0]
        self.registry = CollectorRegistry()
        self.registry.register(_RoutingCollector(self.misrouted_hints))
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
        app.get("/metrics")(self.metrics)
        app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])(self.anywhere)
        app.add_middleware(Gate, config=self.config, metrics=self)
        app.add_middleware(BodySizeLimit, max_nbytes=self.config.max_body_nbytes)
        return app

    @property
    def view(self) -> RoutingView:
        """The engine router's view of the replicas and its counters (see router.shared_view)."""
        return shared_view()

    async def _live_ranks(self) -> list[int]:
        """The live replicas' ranks. The handle builds its router on its first request, so a
        route that needs the ranks before any request was sent makes one and waits for them."""
        if not self.view.live_ranks:
            _own_request_id()
            await self.engine.describe.remote(route=Route())
            for _ in range(RANKS_WAIT_POLLS):
                if self.view.live_ranks:
                    break
                await asyncio.sleep(RANKS_POLL_S)
        if not self.view.live_ranks:
            raise APIError(503, "no engine replica is up")
        return list(self.view.live_ranks)

    # --- relaying ------------------------------------------------------------------------------
    async def _relay(self, request: Request, route: Route, body: bytes | None = None,
                     headers: dict[bytes, bytes] | None = None, path: str | None = None) -> tuple[RelayHead, object]:
        """Send the request (with `body`, `headers` and `path` replaced where given) to the
        replica the router picks; the response head and the rest of the response stream. A
        replica that dies before its head arrives is retried."""
        body = await request.body() if body is None else body
        replaced = {**(headers or {}), b"content-length": str(len(body)).encode()}
        raw = [(k, v) for k, v in request.headers.raw if k not in replaced] + list(replaced.items())
        relayed = RelayRequest(request.method, path or request.url.path, request.url.query.encode(), raw, body)
        for delay_s in (*RETRY_DELAYS_S, None):
            _own_request_id()
            stream = self.engine.options(stream=True).relay.remote(relayed, route=route)
            try:
                head = await stream.__anext__()
                return head, stream
            except REPLICA_DIED as exc:
                stream.cancel()
                if delay_s is None:
                    raise APIError(503, f"no engine replica could take the request: {exc}") from exc
                logger.warning("an engine replica died (%s); retrying in %.1f s", type(exc).__name__, delay_s)
                await asyncio.sleep(delay_s)

    async def _forward(self, request: Request, route: Route, **kwargs) -> Response:
        head, stream = await self._relay(request, route, **kwargs)
        headers = [(k, v) for k, v in head.headers if k.lower() not in HOP_BY_HOP]

        async def body():
            try:
                async for chunk in stream:
                    yield chunk
            finally:
                stream.cancel()

        response = StreamingResponse(body(), status_code=head.status)
        response.raw_headers = headers
        return response

    async def _json_from(self, request: Request, route: Route, body: bytes | None = None,
                         path: str | None = None) -> tuple[int, dict, int]:
        """(status, JSON body, replica rank) of a relayed request whose answer is JSON."""
        head, stream = await self._relay(request, route, body=body, path=path)
        data = b"".join([chunk async for chunk in stream])
        rank = next((int(v) for k, v in head.headers if k == b"x-scalesim-replica"), -1)
        return head.status, json.loads(data), rank

    # --- routes ----------------------------------------------------------------------------------
    async def completion(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):  # the replica answers the 4xx
            return await self._forward(request, Route())
        agent_id, inferred = _agent_of_completion(body, request.headers.get("x-agent-id"), self.spans)
        extra = {AGENT_ID_HEADER.lower().encode(): agent_id.encode("latin-1", "replace")} \
            if inferred and agent_id.isascii() else None
        return await self._forward(request, Route(agent_id=agent_id), headers=extra)

    async def create_agent(self, request: Request) -> Response:
        try:
            agent_id = json.loads(await request.body()).get("id")
        except (ValueError, AttributeError):
            agent_id = None
        return await self._forward(request, Route(agent_id=agent_id if isinstance(agent_id, str) else None))

    async def agent(self, agent_id: str, request: Request) -> Response:
        status, data, rank = await self._json_from(request, Route(agent_id=agent_id))
        if status == 200 and request.method == "GET":
            data["replica"] = rank
        return JSONResponse(data, status_code=status)

    async def hints(self, request: Request) -> Response:
        batch = await run_in_threadpool(_parse_hints, await request.body())
        fields = {name: getattr(batch, name) for name in batch.model_fields_set if name != "step"}
        return await self._fan_out_hints(request, batch.step, fields)

    async def paper_update(self, body: PaperUpdate, request: Request) -> Response:
        return await self._fan_out_hints(request, body.timestep_cnt, body.model_dump(exclude={"timestep_cnt"}))

    async def _fan_out_hints(self, request: Request, step: int | None, fields: dict) -> Response:
        """Per-agent distances computed here (turn orders, graphs and positions relate agents, so
        they cannot be split as they come), then one /v1/hints call per live replica with its
        agents' share; `schedule` stays absolute and goes to each replica with the step."""
        if step is not None and not 0 <= step <= MAX_HINT_STEP:
            raise APIError(400, f"step must be in [0, {MAX_HINT_STEP}]", param="step")
        fields = {k: v for k, v in fields.items() if v is not None}
        schedule = fields.pop("schedule", None) or {}
        try:
            distances = await run_in_threadpool(estimate_distances, 0, **fields) if fields else {}
        except (ValueError, TypeError, ArithmeticError) as exc:
            raise APIError(400, f"bad hint: {exc}")
        ranks = await self._live_ranks()
        shares = {rank: ({}, {}) for rank in ranks}
        every_rank = sorted(set(ranks) | set(self.view.requests_by_rank))
        for part, source in ((0, distances), (1, schedule)):
            for agent, value in source.items():
                owner = self.view.owner(agent)
                shares[owner][part][agent] = value
                self.misrouted_hints[0] += self.view.placement.table.order(agent, every_rank)[0] != owner
        calls = [self._json_from(request, Route(rank=rank), json.dumps(
            {"step": step, "distances": share[0], **({"schedule": share[1]} if share[1] else {})}).encode(),
            path="/v1/hints") for rank, share in shares.items()]
        results = await asyncio.gather(*calls)
        failed = next(((status, data) for status, data, _ in results if status != 200), None)
        if failed:
            return JSONResponse(failed[1], status_code=failed[0])
        totals = {k: sum(data[k] for _, data, _ in results) for k in ("agents", "changed", "unknown")}
        return {"object": "hint_result", "step": max(data["step"] for _, data, _ in results), **totals,
                "agents_by_replica": {str(rank): data["agents"] for _, data, rank in results}}

    async def replicas(self) -> dict:
        ranks = await self._live_ranks()

        async def describe(rank: int) -> dict:
            _own_request_id()
            return await self.engine.describe.remote(route=Route(rank=rank))

        described = await asyncio.gather(*(describe(r) for r in ranks), return_exceptions=True)
        return {"object": "list", "data": [d for d in described if isinstance(d, dict)]}

    async def metrics(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST
        ranks = await self._live_ranks()
        scraped = await asyncio.gather(*(self._scrape(request, rank) for rank in ranks), return_exceptions=True)
        lines = [line for rank, text in zip(ranks, scraped) if isinstance(text, str)
                 for line in _label_replica(text, rank)]
        return Response(generate_latest(self.registry) + ("\n".join(lines) + "\n").encode(),
                        media_type=CONTENT_TYPE_LATEST)

    async def _scrape(self, request: Request, rank: int) -> str:
        head, stream = await self._relay(request, Route(rank=rank), body=b"")
        return b"".join([chunk async for chunk in stream]).decode()

    async def anywhere(self, path: str, request: Request) -> Response:
        return await self._forward(request, Route())

"""The FastAPI application: routes, Host and API-key checks, body-size limit, OpenAI-style errors.

`build_app(llm, config)` returns an app over an existing `AsyncLLM` (tests and notebooks);
`scalesim serve` builds the engine from flags and runs it under uvicorn.
"""

import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.responses import Response

from scalesim.async_llm import AsyncLLM
from scalesim.embeddings.sentence_embedder import SentenceEmbedder
from scalesim.server import agent_routes, embedding_routes, openai_routes
from scalesim.server.agent_store import AgentStore
from scalesim.server.config import ServerConfig
from scalesim.server.errors import error_response, install_error_handlers
from scalesim.server.metrics import ServerMetrics
from scalesim.server.state import ServerState

logger = logging.getLogger(__name__)
PUBLIC_PATHS = ("/health", "/metrics")


class BodySizeLimit:
    """Refuse request bodies over `max_nbytes` with a 413, by Content-Length or while streaming in."""

    def __init__(self, app, max_nbytes: int) -> None:
        self.app = app
        self.max_nbytes = max_nbytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_nbytes:
            return await self._refuse(send)
        seen = 0
        started = refused = False

        async def counting_receive():
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_nbytes and not refused:
                refused = True
                if not started:
                    await self._refuse(send)
                return {"type": "http.disconnect"}  # the app stops reading; what it answers is dropped
            return message

        async def tracking_send(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except Exception:
            if not refused:
                raise

    async def _refuse(self, send) -> None:
        body = error_response(413, f"request body over the limit of {self.max_nbytes} bytes").body
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class Gate:
    """Before any route: the Host header must name this server (against DNS rebinding) and the API
    key must match on every path but the public ones; /v1 requests are counted by route and status."""

    def __init__(self, app, config: ServerConfig, metrics: ServerMetrics) -> None:
        self.app, self.config, self.metrics = app, config, metrics
        self.public = PUBLIC_PATHS if not config.metrics_require_key else ("/health",)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        path = scope["path"]
        status = None

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if not self.config.host_allowed(headers.get(b"host", b"").decode("latin-1")):
                await error_response(400, "the Host header does not name this server (see --allowed-hosts)",
                                     code="invalid_host")(scope, receive, recording_send)
            elif self.config.api_key and path not in self.public and not secrets.compare_digest(
                    headers.get(b"authorization", b""), f"Bearer {self.config.api_key}".encode()):
                await error_response(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                     code="invalid_api_key")(scope, receive, recording_send)
            else:
                await self.app(scope, receive, recording_send)
        except Exception:
            status = status or 500
            raise
        finally:
            if path.startswith("/v1"):  # refused early, a request has no route: "other"
                route = scope.get("route")
                self.metrics.requests.labels(getattr(route, "path", "other"), str(status or 499)).inc()


def build_app(llm: AsyncLLM, config: ServerConfig, shutdown_llm: bool = False,
              embedder: SentenceEmbedder | None = None) -> FastAPI:
    state = ServerState(llm, config, AgentStore(config.state_dir), ServerMetrics(llm), embedder)
    state.check_aliases()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        restored = state.restore_agents()
        if restored:
            logger.info("restored %d agents from %s", restored, state.agents.path)
            await agent_routes.prefill_registered(state)
        yield
        state.agents.close()
        if shutdown_llm:
            llm.shutdown()

    app = FastAPI(title="ScaleSim", description="An OpenAI-compatible server for multi-agent simulations",
                  lifespan=lifespan)
    app.state.scalesim = state
    install_error_handlers(app)
    app.include_router(openai_routes.router)
    app.include_router(agent_routes.router)
    app.include_router(embedding_routes.router)

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": state.model_cards()}

    @app.get("/metrics")
    def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(Gate, config=config, metrics=state.metrics)
    app.add_middleware(BodySizeLimit, max_nbytes=config.max_body_nbytes)
    return app

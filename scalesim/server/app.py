"""The FastAPI application: routes, API-key check, body-size limit, OpenAI-style errors.

`build_app(llm, config)` returns an app over an existing `AsyncLLM` (tests and embedding);
`scalesim serve` builds the engine from flags and runs it under uvicorn.
"""

import logging
import secrets
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import Response

from scalesim.async_llm import AsyncLLM
from scalesim.server import agent_routes, openai_routes
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


def build_app(llm: AsyncLLM, config: ServerConfig, shutdown_llm: bool = False) -> FastAPI:
    state = ServerState(llm, config, AgentStore(config.state_dir), ServerMetrics(llm))

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

    @app.middleware("http")
    async def api_key_and_metrics(request: Request, call_next):
        path = request.url.path
        if config.api_key and path.startswith("/v1") and not secrets.compare_digest(
                request.headers.get("authorization", "").encode(), f"Bearer {config.api_key}".encode()):
            response = error_response(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                                      code="invalid_api_key")
        else:
            response = await call_next(request)
        if path.startswith("/v1"):
            route = request.scope.get("route")
            state.metrics.requests.labels(getattr(route, "path", "other"), str(response.status_code)).inc()
        return response

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    def models():
        weights = llm.engine.weights
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "scalesim",
                 "root": config.served_model_name if name != config.served_model_name else None,
                 "kind": "private_model" if name in weights.models else "adapter" if ":" in name else "base"}
                for name in state.model_names()]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    app.add_middleware(BodySizeLimit, max_nbytes=config.max_body_nbytes)
    return app


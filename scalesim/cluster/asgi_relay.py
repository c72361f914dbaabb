"""One HTTP request, carried as plain data between processes and run through an ASGI app.

The ingress turns an incoming request into a `RelayRequest` (picklable), an engine replica runs it
through its own FastAPI app with `run_asgi`, which yields the response head first and then its
body chunks as they are sent, so a streamed (SSE) answer streams across the Ray call too.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

REPLICA_HEADER = "x-scalesim-replica"  # the response header naming the engine replica that answered
logger = logging.getLogger(__name__)


@dataclass
class RelayRequest:
    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""


@dataclass
class RelayHead:
    status: int
    headers: list[tuple[bytes, bytes]]

    @property
    def replica(self) -> int | None:
        """The rank of the engine replica that answered (its REPLICA_HEADER)."""
        return next((int(v) for k, v in self.headers if k == REPLICA_HEADER.encode()), None)


async def run_asgi(app, request: RelayRequest) -> AsyncIterator[RelayHead | bytes]:
    """The response of `app` to `request`: a RelayHead, then body chunks. Closing the iterator
    early tells the app that the client left (it aborts the request's generation)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
             "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
             "query_string": request.query, "headers": request.headers, "client": ("ingress", 0),
             "server": ("replica", 0)}
    sent: asyncio.Queue = asyncio.Queue()
    body_read = False
    disconnected = asyncio.Event()
    done = object()

    async def receive():
        nonlocal body_read
        if not body_read:
            body_read = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        await sent.put(message)

    async def run():
        try:
            await app(scope, receive, send)
        finally:
            await sent.put(done)

    task = asyncio.ensure_future(run())
    started = False
    try:
        while (message := await sent.get()) is not done:
            if message["type"] == "http.response.start":
                started = True
                yield RelayHead(message["status"], list(message.get("headers", [])))
            elif message["type"] == "http.response.body" and message.get("body"):
                yield bytes(message["body"])
        try:
            await task
        except Exception:
            if not started:
                raise  # no answer at all: the caller sees the error
            logger.exception("%s %s failed after its answer was sent", request.method, request.path)
    finally:
        disconnected.set()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

"""Connection limits: how long a client may take to send a request, how long an idle connection
stays open, and how many requests are served at once.

uvicorn times out only idle keep-alive connections; a client that connects and sends nothing,
half a request line or half a body would hold its connection (and a file descriptor) forever.
`TimedH11Protocol` gives every request a read deadline from its first byte (or from the
connection's start) until its body is complete; past it the client gets a 408 and is closed.
"""

import asyncio

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from scalesim.server.config import ServerConfig
from scalesim.server.errors import error_response


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline (`read_timeout_s`) for reading each whole request."""

    read_timeout_s: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._read_deadline: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # a new request starts arriving
            self._arm()
        super().data_received(data)
        if self.cycle is not None and not self.cycle.more_body and not self.cycle.response_complete:
            self._disarm()  # the request is in, whole

    def _arm(self) -> None:
        if self._read_deadline is None:
            self._read_deadline = self.loop.call_later(self.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        started = self.cycle is not None and not self.cycle.response_complete and self.cycle.response_started
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app, if it is reading the body, sees a disconnect
            self.cycle.message_event.set()
        if not started:
            body = error_response(408, f"the request did not arrive within {self.read_timeout_s:g} s").body
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def uvicorn_config(app, config: ServerConfig, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    """uvicorn settings carrying the server's connection limits."""
    protocol = type("ScaleSimH11Protocol", (TimedH11Protocol,), {"read_timeout_s": config.request_read_timeout_s})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          timeout_keep_alive=config.keep_alive_timeout_s, limit_concurrency=config.max_connections)

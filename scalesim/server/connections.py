"""Connection limits: how long a client may take to send a request, how long an idle connection
stays open, and how many requests are served at once.

uvicorn times out only idle keep-alive connections; a client that connects and sends nothing,
half a request line or half a body would hold its connection (and a file descriptor) forever.
`TimedH11Protocol` gives every request a read deadline from its first byte (or from the
connection's start) until its body is complete; past it the client gets a 408 and is closed. A
client that stops reading its answer (the socket's buffers full) for `send_timeout_s` is closed
too, and its request aborted, instead of holding a stream for ever.
"""

import asyncio
import functools

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from scalesim.server.config import ServerConfig
from scalesim.server.errors import error_response


class TimedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline (`read_timeout_s`) for reading each whole request:
    armed when a connection opens, when a request starts arriving (pipelined ones included) and
    while its body is incomplete; disarmed when the body is in or the response is complete."""

    def __init__(self, *args, read_timeout_s: float, send_timeout_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout_s = read_timeout_s
        self.send_timeout_s = send_timeout_s
        self._read_deadline: asyncio.TimerHandle | None = None
        self._send_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._send_deadline is not None:
            self._send_deadline.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        """The client reads slower than we write: it has `send_timeout_s` to catch up."""
        super().pause_writing()
        if self._send_deadline is None:
            self._send_deadline = self.loop.call_later(self.send_timeout_s, self._send_timed_out)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_deadline is not None:
            self._send_deadline.cancel()
            self._send_deadline = None

    def _send_timed_out(self) -> None:
        """Close a client that stopped reading; its request sees a disconnect and is aborted."""
        self._send_deadline = None
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.cycle is None or self.cycle.response_complete:  # a new request starts arriving
            self._arm()
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.more_body and not cycle.response_started:
                self._arm()  # a request (maybe pipelined) whose body is still coming
            else:
                self._disarm()  # the request is in, whole, or already being answered

    def on_response_complete(self) -> None:
        self._disarm()  # an idle connection is uvicorn's keep-alive timer's, a new request ours
        super().on_response_complete()

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
        cycle = self.cycle
        answering = cycle is not None and not cycle.response_complete and cycle.response_started
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app, if it is reading the body, sees a disconnect
            cycle.message_event.set()
        if not answering:
            body = error_response(408, f"the request did not arrive within {self.read_timeout_s:g} s",
                                  code="request_timeout").body
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.close()


def uvicorn_config(app, config: ServerConfig, host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    """uvicorn settings carrying the server's connection limits."""
    protocol = functools.partial(TimedH11Protocol, read_timeout_s=config.request_read_timeout_s,
                                 send_timeout_s=config.send_timeout_s)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          timeout_keep_alive=config.keep_alive_timeout_s, limit_concurrency=config.max_connections)

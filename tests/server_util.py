"""Start a real uvicorn server on a free loopback port for a test, and stop it afterwards."""

import socket
import threading
import time
from contextlib import contextmanager

import httpx
import uvicorn

from scalesim import AsyncLLM
from scalesim.server.app import build_app
from scalesim.server.config import ServerConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(llm: AsyncLLM, config: ServerConfig):
    """Yield the base URL (http://127.0.0.1:PORT) of `llm` served with `config`; shut both down after."""
    app = build_app(llm, config, shutdown_llm=True)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def metric(base_url: str, name: str) -> float:
    """One unlabelled sample from /metrics."""
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)

"""Run the server in a background thread of this process (benchmarks, tests, notebooks), and wait
for one to come up."""

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import uvicorn

from scalesim.async_llm import AsyncLLM
from scalesim.embeddings.sentence_embedder import SentenceEmbedder
from scalesim.server.app import build_app
from scalesim.server.config import ServerConfig
from scalesim.server.connections import uvicorn_config

STARTUP_TIMEOUT_S = 60.0


def wait_healthy(url: str, timeout_s: float, process: subprocess.Popen | None = None) -> None:
    """Return once `url`/health answers 200; a RuntimeError when `process` (the server, if it
    is one) exits first, with its last stderr, or when `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"scalesim serve exited: {process.stderr.read()[-2000:] if process.stderr else ''}")
        try:
            if httpx.get(url + "/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up in {timeout_s:.0f} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_in_thread(llm: AsyncLLM, config: ServerConfig, shutdown_llm: bool = True,
                    embedder: SentenceEmbedder | None = None) -> Iterator[str]:
    """Yield the base URL (http://127.0.0.1:PORT) of `llm` (and `embedder`) served with `config`
    on a free loopback port; stop the server (and the engine, when `shutdown_llm`) on exit."""
    port = free_port()
    app = build_app(llm, config, shutdown_llm=shutdown_llm, embedder=embedder)
    server = uvicorn.Server(uvicorn_config(app, config, "127.0.0.1", port))
    thread = threading.Thread(target=server.run, name="scalesim-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the HTTP server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)

"""Helpers for tests that talk to a real uvicorn server on a free loopback port."""

import httpx

from scalesim.server.background import serve_in_thread as running_server

__all__ = ["running_server", "metric"]


def metric(base_url: str, name: str) -> float:
    """One unlabelled sample from /metrics."""
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)

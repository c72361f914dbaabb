"""Helpers for tests that talk to a real uvicorn server on a free loopback port."""

import httpx

from scalesim.server.background import serve_in_thread as running_server

__all__ = ["running_server", "metric", "server_connections"]


def metric(base_url: str, name: str) -> float:
    """One unlabelled sample from /metrics."""
    return metrics(base_url, (name,))[name]


def metrics(base_url: str, names) -> dict[str, float]:
    """Unlabelled samples from one read of /metrics, by name (KeyError for one that is missing)."""
    found = {}
    for line in httpx.get(base_url + "/metrics").text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            found[name] = float(value.split()[0])
    return {name: found[name] for name in names}


def server_connections(port: int) -> int:
    """Established TCP connections whose local end is `port` (the server's side of each)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                count += int(local.rsplit(":", 1)[1], 16) == port and state == "01"
    return count

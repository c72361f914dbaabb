"""`scalesim microbench overload`: an overloaded OASIS-like burst against two builds of the server.

Frameworks time out and retry (OASIS: the openai client, a read timeout, retries). On a server
that keeps computing a request its client has left, every timeout adds a copy of the work: the
server multiplies its own load. This bench sends `agents` concurrent OASIS-shaped chat requests
(13 strict tools, a private profile, the feed as JSON; `scalesim/sim/oasis_requests.py`) with the
openai client's `timeout_s` and `retries`, to a fresh `scalesim serve` of each build in turn
(`--before-src`: a checkout of an earlier commit, e.g. one that did not abort abandoned
non-streamed requests; and this tree), interleaved over rounds. Per round and build:
- calls completed (a 200 within the retries) and failed;
- tokens the server generated (its /metrics) against tokens delivered in completed replies:
  the difference is generated for nobody (by copies whose client left, before or after it left);
- seconds until every call has resolved, and until the server is idle after that.
"""

import asyncio
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from scalesim.bench.peer_bench import Server, launch, wait_ready
from scalesim.server.background import free_port
from scalesim.sim import oasis_requests as oasis

IDLE_TIMEOUT_S = 600.0


@dataclass
class OverloadRound:
    build: str
    round: int
    completed: int
    failed: int
    generated_tokens: float
    delivered_tokens: int
    wasted_tokens: float
    calls_resolved_s: float
    idle_after_s: float
    probe_status: int  # see _build_probe


def _metrics(url: str) -> dict[str, float]:
    """The server's unlabelled Prometheus samples, by name, from one scrape."""
    samples = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        name, _, value = line.partition(" ")
        if value and not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


def _start(build: str, src: str, model: str, log_dir: str) -> Server:
    command = [sys.executable, "-m", "scalesim.cli", "serve", model, "--port", str(free_port())]
    return wait_ready(launch(build, command, dict(os.environ, PYTHONPATH=src), model, log_dir, cwd=src))


def _build_probe(url: str, model: str) -> int:
    """The status of a chat whose text holds a lone surrogate: 400 from a build that validates
    text, 500 from 9d6bdac and before; it shows which build really answered."""
    body = ('{"model": "%s", "max_tokens": 1, "messages": [{"role": "user", "content": "\\ud800"}]}' % model)
    return httpx.post(url + "/v1/chat/completions", content=body.encode(), timeout=120,
                      headers={"Content-Type": "application/json"}).status_code


async def _burst(url: str, model: str, agents: int, timeout_s: float, retries: int,
                 long_replies: int | None) -> tuple[int, int, int]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", timeout=timeout_s, max_retries=retries)

    async def call(i: int) -> int | None:
        messages = [{"role": "system", "content": oasis.profile(i)}, {"role": "user", "content": oasis.feed(0, i)}]
        body = {**oasis.request(messages), "model": model}
        if long_replies is not None:
            body.update(max_tokens=long_replies, extra_body={"ignore_eos": True})
        try:
            reply = await client.chat.completions.create(**body)
        except Exception:  # a timeout after the last retry, or an error: the call failed
            return None
        return reply.usage.completion_tokens

    try:
        results = await asyncio.gather(*(call(i) for i in range(agents)))
    finally:
        await client.close()
    done = [r for r in results if r is not None]
    return len(done), agents - len(done), sum(done)


def _one_round(build: str, src: str, round_index: int, model: str, agents: int, timeout_s: float, retries: int,
               long_replies: int | None, log_dir: str) -> OverloadRound:
    server = _start(build, src, model, log_dir)
    try:
        probe = _build_probe(server.url, model)
        started = time.perf_counter()
        completed, failed, delivered = asyncio.run(_burst(server.url, model, agents, timeout_s, retries,
                                                                  long_replies))
        resolved_s = time.perf_counter() - started
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while True:
            metrics = _metrics(server.url)
            busy = metrics["scalesim_num_requests_running"] or metrics["scalesim_num_requests_waiting"]
            if not busy or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        idle_after_s = time.perf_counter() - started - resolved_s
        generated = metrics["scalesim_generation_tokens_total"]
    finally:
        server.stop()
    return OverloadRound(build, round_index, completed, failed, generated, delivered, generated - delivered,
                         resolved_s, idle_after_s, probe)


def _git_commit(src: str) -> str:
    """The commit `src` holds, with '+uncommitted' when its scalesim/ differs from it."""
    try:
        head = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", src, "status", "--porcelain", "--", "scalesim"], capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted" if dirty else "")


def run_overload_bench(before_src: str, model: str = "smollm2-135m", agents: int = 40, timeout_s: float = 20.0,
                       retries: int = 2, rounds: int = 2, long_replies: int | None = None,
                       log_dir: str = "/tmp") -> dict:
    """`long_replies`: every call asks for exactly this many tokens (max_tokens and ignore_eos), a
    decode-heavy variant; None sends what OASIS sends (no max_tokens: the server's cap, 256)."""
    this_tree = str(Path(__file__).resolve().parents[2])
    builds = {"before": before_src, "after": this_tree}
    results: list[OverloadRound] = []
    for r in range(rounds):
        order = list(builds) if r % 2 == 0 else list(reversed(builds))
        for build in order:
            result = _one_round(build, builds[build], r, model, agents, timeout_s, retries, long_replies, log_dir)
            print(f"round {r} {build}: {result.completed} completed, {result.failed} failed, "
                  f"{result.generated_tokens:.0f} generated, {result.wasted_tokens:.0f} for nobody, "
                  f"calls resolved in {result.calls_resolved_s:.1f} s, idle {result.idle_after_s:.1f} s later",
                  flush=True)
            results.append(result)

    def median(build: str, key: str) -> float:
        return statistics.median(getattr(x, key) for x in results if x.build == build)

    keys = ("completed", "failed", "generated_tokens", "delivered_tokens", "wasted_tokens", "calls_resolved_s",
            "idle_after_s")
    return {"bench": "overload", "model": model, "agents": agents, "client_timeout_s": timeout_s,
            "client_retries": retries, "rounds": rounds, "long_replies": long_replies,
            "builds": {"before": {"src": before_src, "commit": _git_commit(before_src)},
                       "after": {"src": this_tree, "commit": _git_commit(this_tree)}},
            "medians": {b: {k: median(b, k) for k in keys} for b in builds},
            "per_round": [asdict(x) for x in results]}

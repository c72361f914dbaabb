"""Drive a workload trace step by step with the framework's concurrency.

Per step: send the step's hints, then start every call once the calls it depends on have
replied, at most `max_concurrency` at a time, calls of one agent one after another; a barrier
ends the step. Each agent keeps its conversation (system prompt, then its turns, trimmed to its
window). The target is the engine in this process or any OpenAI-compatible URL.
"""

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Protocol

from tqdm import tqdm

from scalesim.sim.workloads.trace import AgentSpec, Call, Trace


@dataclass
class CallResult:
    agent_id: str
    step: int
    ttft_s: float
    latency_s: float
    tokens_out: int
    text: str


@dataclass
class RunResult:
    makespan_s: float
    calls: list[CallResult]
    occupancy: list[tuple[float, int]] = field(default_factory=list)  # (seconds, device bytes used)


class Target(Protocol):
    async def chat(self, agent_id: str, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
        """Run one call; return (seconds to first token, reply text, tokens generated)."""

    async def hint(self, step: int, hints: dict) -> None: ...

    def device_used_nbytes(self) -> int | None: ...


class InProcessTarget:
    """The engine in this process (an AsyncLLM), agent ids passed directly."""

    def __init__(self, llm) -> None:
        self.llm = llm

    async def chat(self, agent_id: str, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
        from scalesim.sampling_params import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        started, ttft, text, tokens = time.perf_counter(), None, "", 0
        async for delta in self.llm.chat(messages, params, agent_id=agent_id):
            ttft = ttft if ttft is not None else time.perf_counter() - started
            text += delta.text
            tokens += len(delta.token_ids)
        return ttft or 0.0, text, tokens

    async def hint(self, step: int, hints: dict) -> None:
        await asyncio.get_running_loop().run_in_executor(None, lambda: self.llm.hint(step, **hints))

    def device_used_nbytes(self) -> int | None:
        return self.llm.memory_stats().get("device_used_nbytes")


class OpenAITarget:
    """Any OpenAI-compatible server: the agent id goes in `extra_body`; hints go to /v1/hints
    when the server has that endpoint (a plain vLLM server does not: then none are sent)."""

    def __init__(self, base_url: str, model: str, api_key: str = "EMPTY", timeout_s: float = 600.0) -> None:
        import httpx
        from openai import AsyncOpenAI

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.client = AsyncOpenAI(base_url=self.base_url + "/v1" if not self.base_url.endswith("/v1") else self.base_url,
                                  api_key=api_key, timeout=timeout_s, max_retries=0)
        self.http = httpx.AsyncClient(timeout=timeout_s, headers={"Authorization": f"Bearer {api_key}"})
        self.hints_supported: bool | None = None

    async def chat(self, agent_id: str, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
        started, ttft, text, tokens = time.perf_counter(), None, "", 0
        stream = await self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
            extra_body={"agent_id": agent_id, "ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - started
                text += chunk.choices[0].delta.content
                tokens += 1
        return ttft or 0.0, text, tokens

    async def hint(self, step: int, hints: dict) -> None:
        if self.hints_supported is False:
            return
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        response = await self.http.post(root + "/v1/hints", json={"step": step, **hints})
        self.hints_supported = response.status_code != 404

    def device_used_nbytes(self) -> int | None:
        return None

    async def close(self) -> None:
        """Close both HTTP clients on the loop that opened them (left to the garbage collector,
        they would close after `asyncio.run` has closed the loop, and log an error each)."""
        await self.client.close()
        await self.http.aclose()

    async def replay(self, trace: Trace, **kwargs) -> RunResult:
        """`run_trace` on this server, closing the clients after."""
        try:
            return await run_trace(trace, self, **kwargs)
        finally:
            await self.close()


def add_hint_noise(hints: dict, noise_steps: float, rng: random.Random, step: int) -> dict:
    """Every distance the hints imply, off by a random error of up to +-noise_steps; with noise
    of inf the hints are withheld (the learned fallback alone)."""
    if noise_steps == 0:
        return hints
    if noise_steps == float("inf"):
        return {}
    from scalesim.distance.hints import estimate_distances

    distances = estimate_distances(step, **hints)
    return {"distances": {a: max(0.0, d + rng.uniform(-noise_steps, noise_steps))
                          for a, d in distances.items() if d != float("inf")}}


def _messages(agent: AgentSpec, history: list[dict], user: str) -> list[dict]:
    turns = history if agent.history_turns is None else history[len(history) - 2 * agent.history_turns:]
    turns = [] if agent.history_turns == 0 else turns
    return [{"role": "system", "content": agent.system}, *turns, {"role": "user", "content": user}]


async def run_trace(trace: Trace, target: Target, desc: str = "run", hint_noise_steps: float = 0.0,
                    seed: int = 0, show_progress: bool = True) -> RunResult:
    rng = random.Random(seed)
    agents = {a.agent_id: a for a in trace.agents}
    histories: dict[str, list[dict]] = {a: [] for a in agents}
    agent_locks = {a: asyncio.Lock() for a in agents}
    limit = asyncio.Semaphore(trace.max_concurrency)
    results: list[CallResult] = []
    occupancy: list[tuple[float, int]] = []
    started = time.perf_counter()
    bar = tqdm(total=trace.num_calls, desc=desc, disable=not show_progress, leave=False)

    async def run_call(step: int, call: Call, deps: list[asyncio.Task]) -> str:
        replies = [await d for d in deps]
        user = call.user + ("\n" + "\n".join(replies) if call.quote_replies and replies else "")
        async with agent_locks[call.agent_id], limit:
            messages = _messages(agents[call.agent_id], histories[call.agent_id], user)
            call_started = time.perf_counter()
            ttft, text, tokens = await target.chat(call.agent_id, messages, call.max_tokens)
            results.append(CallResult(call.agent_id, step, ttft, time.perf_counter() - call_started, tokens, text))
            histories[call.agent_id] += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        bar.update(1)
        return text

    for step in trace.steps:
        await target.hint(step.index, add_hint_noise(step.hints, hint_noise_steps, rng, step.index))
        tasks: list[asyncio.Task] = []
        for call in step.calls:
            tasks.append(asyncio.create_task(run_call(step.index, call, [tasks[i] for i in call.after])))
        await asyncio.gather(*tasks)
        used = target.device_used_nbytes()
        if used is not None:
            occupancy.append((time.perf_counter() - started, used))
    bar.close()
    return RunResult(makespan_s=time.perf_counter() - started, calls=results, occupancy=occupancy)

"""`AsyncLLM`: many concurrent asyncio callers share one continuously batched engine.

A background thread owns the engine loop. `generate` is an async generator of `SequenceDelta`s;
leaving it early (a client disconnects, a task is cancelled) aborts the request and frees its
pages before the next step. Adding a request takes the engine lock in a worker thread, so the
event loop never blocks on a running step; an abort is queued without waiting at all, so it
happens even when the caller's task is being cancelled.
"""

import asyncio
import logging
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from scalesim.config import EngineConfig
from scalesim.engine.llm_engine import LLMEngine
from scalesim.errors import GenerationError, InvalidRequestError, OverloadedError
from scalesim.llm import Messages, Prompt, render_chat
from scalesim.outputs import SequenceDelta
from scalesim.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
LOOP_JOIN_TIMEOUT_S = 30.0
# An idle engine that gets a request waits while more keep coming, each within BURST_QUIET_S of
# the last, up to BURST_MAX_S, so that a burst sent at once starts in one step (`_gather_burst`);
# a lone request waits BURST_QUIET_S. 2 ms caught too few of a burst over HTTP to measure a gain.
BURST_QUIET_S, BURST_MAX_S = 0.005, 0.05


class EngineDeadError(GenerationError):
    """The engine loop failed while running this request."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class _EngineLoop:
    """The engine and what its loop thread shares with callers. It never refers back to the
    `AsyncLLM`, so a dropped `AsyncLLM` is collected and its finaliser stops this loop."""

    def __init__(self, make_engine: Callable[[], LLMEngine]) -> None:
        """Build the engine on the loop thread and return once it is built (or raise what building
        raised). Built on the thread that steps it: an engine built on one thread and stepped on
        another decoded about 1.3x slower on the CPU (batch 16, bf16, 4 interleaved pairs of runs:
        57-87 against 41-53 ms per step), per-thread state of the compute libraries being the suspect."""
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.streams: dict[str, _Stream] = {}
        self.aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.stopping = self.stop_on_exit = False
        self.added = 0  # requests added so far (under the lock)
        built: list = []
        ready = threading.Event()

        def build_then_run() -> None:
            try:
                self.engine = make_engine()
            except BaseException as exc:  # re-raised on the caller's thread
                built.append(exc)
                ready.set()
                return
            ready.set()
            self.run()

        self.thread = threading.Thread(target=build_then_run, name="scalesim-engine", daemon=True)
        self.thread.start()
        ready.wait()
        if built:
            self.thread.join()
            raise built[0]

    def stop(self) -> None:
        """Stop the loop and the engine, failing what is in flight (called once, by the finaliser)."""
        if threading.current_thread() is self.thread:  # collected on the loop thread, which holds the lock
            self.stopping = self.stop_on_exit = True  # the loop sees it and stops the engine itself
            return
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=LOOP_JOIN_TIMEOUT_S)
        self._shut_down()

    def _shut_down(self) -> None:
        self.fail_all(EngineDeadError("the engine was shut down"))
        self.engine.shutdown()

    def run(self) -> None:
        while True:
            with self.wake:
                if not self.stopping and not self.engine.has_unfinished():
                    while not self.stopping and not self.engine.has_unfinished():
                        self.wake.wait()
                    self._gather_burst()
                if self.stopping:
                    if self.stop_on_exit:
                        self._shut_down()
                    return
                while not self.aborts.empty():
                    self.engine.abort(self.aborts.get())
                if not self.engine.has_unfinished():
                    continue
                try:
                    deltas = self.engine.step()
                except Exception as exc:  # keep serving: fail the requests in flight, not the process
                    logger.exception("engine step failed; failing the requests in flight")
                    self.fail_all(EngineDeadError(f"engine step failed: {exc}"))
                    continue
                streams = [(self.streams.get(d.request_id), d) for d in deltas]
            for stream, delta in streams:
                if stream is not None:
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, delta)

    def _gather_burst(self) -> None:
        """Called with the lock held when a request woke the idle engine. The requests of a burst
        (a simulation step's calls, sent at once) reach the engine one by one over a few
        milliseconds; stepping at the first would prefill it alone and the rest a step or two
        later. Measured over HTTP, 8 x 512-token prompts sent at once (bf16, development, 4
        interleaved rounds of fresh servers): 2-3 steps per burst and 4,910 tokens/s without this
        wait, mostly 1 step and 5,439 tokens/s with it; the feed trace 6.20 against 6.09 s
        (inside the noise)."""
        deadline_s = time.monotonic() + BURST_MAX_S
        while not self.stopping:
            seen, left_s = self.added, deadline_s - time.monotonic()
            if left_s <= 0:
                return
            self.wake.wait(min(BURST_QUIET_S, left_s))
            if self.added == seen:
                return

    def fail_all(self, error: Exception) -> None:
        """Fail every request in flight, including any the engine holds without a listener."""
        for stream in list(self.streams.values()):
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
            except RuntimeError:  # its event loop is closed: nobody listens any more
                pass
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)
        self.streams.clear()


class AsyncLLM:
    """Keyword arguments are `EngineConfig` fields, plus `max_waiting`: when the engine already
    holds that many waiting sequences, `generate` raises OverloadedError instead of queueing more.

    Close it with `close()` (or `async with` / `with`); one that is dropped is closed when collected.
    """

    def __init__(self, model: str, max_waiting: int | None = None, **engine_args) -> None:
        if max_waiting is not None and max_waiting <= 0:
            raise ValueError(f"max_waiting must be positive, got {max_waiting}")
        self.max_waiting = max_waiting
        self._core = _EngineLoop(lambda: LLMEngine(EngineConfig(model=model, **engine_args)))
        self.engine = self._core.engine
        self._lock = self._core.lock
        self._close = weakref.finalize(self, _EngineLoop.stop, self._core)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    async def generate(self, prompt: Prompt, sampling_params: SamplingParams | None = None,
                       agent_id: str | None = None, request_id: str | None = None, adapter: str | None = None,
                       model: str | None = None) -> AsyncIterator[SequenceDelta]:
        """Yield each step's new text and tokens of every completion until all `n` finish.
        A completion that fails raises GenerationError; the others of the request are aborted."""
        params = sampling_params or SamplingParams()
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        request = dict(agent_id=agent_id, request_id=request_id, adapter=adapter, model=model)
        adding = loop.run_in_executor(None, self._add, prompt, params, request, stream)
        try:
            request_id = await asyncio.shield(adding)
        except asyncio.CancelledError:  # the caller left while the request was being added: abort it then
            adding.add_done_callback(self._abort_added)
            raise
        remaining = params.n
        try:
            while remaining:
                item = await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.finish_reason == "error":
                    raise GenerationError(item.error or "generation failed")
                remaining -= item.finished
                yield item
        finally:
            if remaining:
                self._core.aborts.put(request_id)
            self._core.streams.pop(request_id, None)

    async def chat(self, messages: Messages, sampling_params: SamplingParams | None = None,
                   **request) -> AsyncIterator[SequenceDelta]:
        async for delta in self.generate(render_chat(self.tokenizer, messages), sampling_params, **request):
            yield delta

    def add_adapter(self, name: str, path: str) -> None:
        with self._lock:
            self.engine.weights.add_adapter(name, path)

    def add_private_model(self, name: str, path: str) -> None:
        with self._lock:
            self.engine.weights.add_private_model(name, path)

    def _abort_added(self, adding: asyncio.Future) -> None:
        if not adding.cancelled() and adding.exception() is None:
            self._core.streams.pop(adding.result(), None)
            self._core.aborts.put(adding.result())

    def check_room(self, sequences: int) -> None:
        """Raise unless `sequences` more could be admitted now: OverloadedError (retry later) when
        the waiting queue is full, InvalidRequestError when they could never fit under max_waiting.
        `generate` checks each request again as it adds it."""
        if self.max_waiting is None:
            return
        if sequences > self.max_waiting:
            raise InvalidRequestError(f"{sequences} sequences can never wait at once here (the limit is "
                                      f"{self.max_waiting}); send fewer prompts or a smaller n")
        waiting = self.engine.num_waiting()
        if waiting + sequences > self.max_waiting:
            raise OverloadedError(f"the server is overloaded: {waiting} sequences wait already (the limit is "
                                  f"{self.max_waiting}); retry later")

    def _add(self, prompt, params, request: dict, stream: _Stream) -> str:
        with self._core.wake:
            if self._core.stopping:
                raise EngineDeadError("the engine is shut down")
            self.check_room(params.n)
            request_id = self.engine.add_request(prompt, params, **request)
            self._core.streams[request_id] = stream
            self._core.added += 1
            self._core.wake.notify()
        return request_id

    def register_agent(self, agent_id: str, adapter: str | None = None, model: str | None = None,
                       prefix: str | None = None) -> None:
        """Record the agent's adapter / private model (registered names); see `prefill` for its prefix."""
        with self._lock:
            self.engine.register_agent(agent_id, adapter=adapter, model=model, prefix=prefix)

    def unregister_agent(self, agent_id: str) -> None:
        with self._lock:
            self.engine.unregister_agent(agent_id)

    async def prefill(self, agent_id: str, prompt: Prompt) -> int:
        """Compute and cache the KV of `prompt` for the agent now; return its prompt tokens."""
        tokens = 0
        async for delta in self.generate(prompt, SamplingParams(max_tokens=1, temperature=0), agent_id=agent_id):
            tokens = delta.num_prompt_tokens or tokens
        return tokens

    def agent_state(self, agent_id: str) -> list[dict]:
        return self.engine.agent_state(agent_id)

    def set_future(self, calls: dict[str, list[float]]) -> None:
        with self._lock:
            self.engine.set_future(calls)

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.engine.abort(request_id)
            self._core.streams.pop(request_id, None)

    def stats(self) -> dict:
        with self._lock:
            return self.engine.stats()

    def hint(self, step: int | None = None, **hints) -> dict:
        """Apply hints without the engine loop's lock: they are parsed with no lock held and
        applied in chunks under the memory manager's, so a huge hint never stalls a step."""
        return self.engine.hint(step, **hints)

    def memory_stats(self) -> dict:
        return self.engine.memory_stats()

    def close(self) -> None:
        """Stop the engine loop and the engine (transfer threads, disk tier); idempotent."""
        self._close()

    shutdown = close

    def __enter__(self) -> "AsyncLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    async def __aenter__(self) -> "AsyncLLM":
        return self

    async def __aexit__(self, *exc) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.close)

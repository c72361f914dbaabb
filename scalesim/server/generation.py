"""From an OpenAI request to engine calls and back: sampling settings, runs, usage, logprobs."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request

from scalesim.errors import InvalidRequestError
from scalesim.outputs import CompletionOutput, SequenceDelta
from scalesim.sampling_params import SamplingParams
from scalesim.server.errors import APIError, ClientLeft
from scalesim.server.protocol import _Sampling
from scalesim.server.state import ServerState

OPENAI_DEFAULT_TEMPERATURE = 1.0
T = TypeVar("T")


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """The result of `work`, or ClientLeft as soon as the client disconnects: `work` is then
    cancelled, which aborts its engine requests (a non-streamed request stops like a stream)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientLeft()
    return task.result()


def check_fan_out(state: ServerState, sequences: int) -> None:
    """A 400 when one request asks for more sequences (prompts x n) than the server allows; a
    429 when the engine's queue has no room for them now (AsyncLLM.check_room)."""
    if sequences > state.config.max_sequences_per_request:
        raise APIError(400, f"this request asks for {sequences} sequences (prompts x n); the limit is "
                            f"{state.config.max_sequences_per_request}", param="n")
    state.llm.check_room(sequences)  # all or none of a request's prompts, as far as it can tell


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now_s() -> int:
    return int(time.time())


def sampling_params(state: ServerState, req: _Sampling, prompt_tokens: int, max_tokens: int | None,
                    logprobs: int | None, grammar: str | None = None) -> SamplingParams:
    """The engine's settings for an OpenAI request; a missing max_tokens is the server's default cap,
    shortened to what the context has left."""
    context_left = state.llm.engine.max_model_len - prompt_tokens
    if context_left <= 0:
        raise APIError(400, f"this model's context is {state.llm.engine.max_model_len} tokens; the prompt has "
                            f"{prompt_tokens}", param="messages", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(state.config.default_max_tokens, context_left)
    try:
        bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}
    except ValueError:
        raise APIError(400, "logit_bias keys must be token ids", param="logit_bias")
    return SamplingParams(
        max_tokens=max_tokens, n=req.n, seed=req.seed, stop=req.stop or [], ignore_eos=req.ignore_eos,
        temperature=OPENAI_DEFAULT_TEMPERATURE if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k or 0, min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logprobs=logprobs, logit_bias=bias, grammar=grammar)


@dataclass
class Run:
    """One request's completions as they accumulate."""

    outputs: list[CompletionOutput]
    prompt_tokens: int = 0
    cached_tokens: int = 0
    deltas: list[SequenceDelta] = field(default_factory=list)

    @property
    def completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


async def stream_deltas(state: ServerState, prompt: list[int], params: SamplingParams, agent_id: str | None,
                        adapter: str | None, model: str | None, run: Run) -> AsyncIterator[SequenceDelta]:
    """Every step's delta of the request, recorded into `run` as it passes."""
    state.metrics.prompt_tokens.inc(len(prompt))
    async for delta in state.llm.generate(prompt, params, agent_id=agent_id, adapter=adapter, model=model):
        run.outputs[delta.index].add(delta)
        run.prompt_tokens = delta.num_prompt_tokens or run.prompt_tokens
        run.cached_tokens = max(run.cached_tokens, delta.num_cached_tokens)
        state.metrics.generated(len(delta.token_ids))
        yield delta


async def run_to_end(state: ServerState, prompt: list[int], params: SamplingParams, agent_id: str | None,
                     adapter: str | None, model: str | None) -> Run:
    run = Run([CompletionOutput(i) for i in range(params.n)], prompt_tokens=len(prompt))
    async for _ in stream_deltas(state, prompt, params, agent_id, adapter, model, run):
        pass
    return run


def tokenize(state: ServerState, text: str | list[int]) -> list[int]:
    try:
        return state.llm.engine.tokenize(text)
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param="prompt")


def chat_logprobs(state: ServerState, infos: list[dict]) -> dict:
    """The chat API's `logprobs.content` for a completion's per-token infos."""
    decode = state.llm.tokenizer.decode

    def entry(token_id: int, logprob: float) -> dict:
        text = decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(i["token_id"], i["logprob"]),
                         "top_logprobs": [entry(t, lp) for t, lp in i["top"].items()]} for i in infos]}


def completion_logprobs(state: ServerState, infos: list[dict], text_offset_start: int = 0) -> dict:
    """The completions API's `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset)."""
    decode = state.llm.tokenizer.decode
    tokens = [decode([i["token_id"]], skip_special_tokens=False) for i in infos]
    offsets, position = [], text_offset_start
    for token in tokens:
        offsets.append(position)
        position += len(token)
    return {"tokens": tokens, "token_logprobs": [i["logprob"] for i in infos],
            "top_logprobs": [{decode([t], skip_special_tokens=False): lp for t, lp in i["top"].items()} for i in infos],
            "text_offset": offsets}

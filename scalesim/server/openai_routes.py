"""`/v1/chat/completions` and `/v1/completions`, streamed over SSE or not."""

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response

from scalesim.outputs import CompletionOutput
from scalesim.server.chat_render import render_prompt
from scalesim.server.errors import APIError, error_body
from scalesim.server.generation import (Run, chat_logprobs, check_fan_out, completion_logprobs, new_id, now_s,
                                        run_to_end, sampling_params, stream_deltas, tokenize, unless_client_leaves)
from scalesim.server.identity import message_texts, resolve_identity
from scalesim.server.output_format import OutputFormat, output_format
from scalesim.server.protocol import ChatCompletionRequest, CompletionRequest
from scalesim.server.sse import DONE, event, primed, sse_response
from scalesim.server.state import ServerState, server_state

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, request: Request, response: Response):
    state = server_state(request)
    messages = [m.model_dump(exclude_none=True) for m in req.messages]
    identity = resolve_identity(req.model, req.agent_id, req.user, request.headers.get("x-agent-id"))
    adapter, model = state.resolve_model(identity.model)
    fmt = output_format(req)
    if fmt.forces_call:
        req.stop = None  # a forced call ends where its grammar does; a stop string would cut it into text
    prompt = tokenize(state, render_prompt(state.llm.tokenizer, messages, fmt.tools))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    check_fan_out(state, req.n)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = sampling_params(state, req, len(prompt), max_tokens, logprobs, grammar=fmt.grammar)
    identity.infer(state.private_spans, message_texts(messages))  # only from requests that are valid
    headers = identity.headers()
    head = {"id": new_id("chatcmpl"), "created": now_s(), "model": req.model}
    if req.stream:
        run = Run([CompletionOutput(i) for i in range(params.n)], prompt_tokens=len(prompt))
        deltas = await unless_client_leaves(
            request, primed(stream_deltas(state, prompt, params, identity.agent_id, adapter, model, run)))
        return sse_response(_chat_events(head, deltas, run, fmt, req, state), headers)
    run = await unless_client_leaves(request, run_to_end(state, prompt, params, identity.agent_id, adapter, model))
    choices = []
    for output in run.outputs:
        message, finish = fmt.message(output)
        choices.append({"index": output.index, "message": message, "finish_reason": finish,
                        "logprobs": chat_logprobs(state, output.logprobs) if logprobs is not None else None})
    response.headers.update(headers)
    return {**head, "object": "chat.completion", "choices": choices, "usage": run.usage()}


async def _chat_events(head: dict, deltas: AsyncIterator, run: Run, fmt: OutputFormat,
                       req: ChatCompletionRequest, state: ServerState) -> AsyncIterator[str]:
    """Chunks as OpenAI streams them; with tools offered a completion is held back until it ends,
    then sent as tool_calls or as text."""
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(index: int, delta: dict, finish: str | None = None, logprobs=None) -> str:
        return event({**head, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                           "finish_reason": finish}]})

    for index in range(len(run.outputs)):
        yield chunk(index, {"role": "assistant", "content": ""})
    async for delta in _until_error(deltas):
        if isinstance(delta, str):
            yield delta
            return
        if fmt.calls:
            if delta.finished:
                message, finish = fmt.message(run.outputs[delta.index])
                if "tool_calls" in message:
                    calls = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
                    yield chunk(delta.index, {"content": message["content"], "tool_calls": calls}, finish)
                else:
                    yield chunk(delta.index, {"content": message["content"]}, finish)
            continue
        logprobs = chat_logprobs(state, delta.logprobs) if delta.logprobs else None
        yield chunk(delta.index, {"content": delta.text} if delta.text or not delta.finished else {},
                    delta.finish_reason, logprobs)
    if (req.stream_options or {}).get("include_usage"):
        yield event({**head, "choices": [], "usage": run.usage()})
    yield DONE


async def _until_error(items: AsyncIterator) -> AsyncIterator:
    """The items, then, if the engine fails mid-stream, one SSE error event (a str) and [DONE]."""
    try:
        async for item in items:
            yield item
    except Exception as exc:  # the 200 is sent already: report in the stream, as OpenAI does
        yield event(error_body(500, f"generation failed: {exc}")) + DONE


def _prompts(prompt) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    return list(prompt)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, request: Request, response: Response):
    state = server_state(request)
    identity = resolve_identity(req.model, req.agent_id, req.user, request.headers.get("x-agent-id"))
    adapter, model = state.resolve_model(identity.model)
    prompts = _prompts(req.prompt)
    check_fan_out(state, len(prompts) * req.n)
    prompts = [tokenize(state, p) for p in prompts]
    params = [sampling_params(state, req, len(p), req.max_tokens, req.logprobs) for p in prompts]
    identity.infer(state.private_spans, [("prompt", req.prompt)] if isinstance(req.prompt, str) else [])
    headers = identity.headers()
    runs = [Run([CompletionOutput(i) for i in range(q.n)], prompt_tokens=len(p)) for p, q in zip(prompts, params)]
    echoes = [state.llm.tokenizer.decode(p, skip_special_tokens=False) if req.echo else "" for p in prompts]
    head = {"id": new_id("cmpl"), "created": now_s(), "model": req.model}
    streams = [stream_deltas(state, p, q, identity.agent_id, adapter, model, r)
               for p, q, r in zip(prompts, params, runs)]
    if req.stream:
        merged = await unless_client_leaves(request, primed(_merge(streams)))
        return sse_response(_completion_events(head, merged, runs, echoes, req, state), headers)
    await unless_client_leaves(request, _drain_all(streams))
    choices = []
    for p, (run, echo) in enumerate(zip(runs, echoes)):
        for output in run.outputs:
            choices.append({"index": p * req.n + output.index, "text": echo + output.text,
                            "finish_reason": output.finish_reason,
                            "logprobs": completion_logprobs(state, output.logprobs, len(echo))
                            if req.logprobs is not None else None})
    response.headers.update(headers)
    return {**head, "object": "text_completion", "choices": choices, "usage": _total_usage(runs)}


def _total_usage(runs: list[Run]) -> dict:
    return {k: sum(r.usage()[k] for r in runs) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


async def _drain(stream: AsyncIterator) -> None:
    async for _ in stream:
        pass


async def _drain_all(streams: list[AsyncIterator]) -> None:
    try:
        async with asyncio.TaskGroup() as group:  # one failing prompt cancels (and aborts) the others
            for stream in streams:
                group.create_task(_drain(stream))
    except ExceptionGroup as failed:
        raise failed.exceptions[0]


async def _merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Items of several streams as they come, tagged with the stream's position; closing the
    merged stream closes (and so aborts) every source."""
    queue: asyncio.Queue = asyncio.Queue()
    finished = object()

    async def pump(position: int, stream: AsyncIterator) -> None:
        try:
            async for item in stream:
                await queue.put((position, item))
            await queue.put((position, finished))
        except Exception as exc:
            await queue.put((position, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            position, item = await queue.get()
            if item is finished:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()


async def _completion_events(head: dict, merged: AsyncIterator, runs: list[Run], echoes: list[str],
                             req: CompletionRequest, state: ServerState) -> AsyncIterator[str]:
    head = {**head, "object": "text_completion"}
    offsets: dict[tuple[int, int], int] = {}  # characters sent so far per choice
    async for item in _until_error(merged):
        if isinstance(item, str):
            yield item
            return
        position, delta = item
        key = (position, delta.index)
        text = delta.text if key in offsets else echoes[position] + delta.text
        logprobs = completion_logprobs(state, delta.logprobs, offsets.get(key, len(echoes[position]))) \
            if delta.logprobs else None
        offsets[key] = offsets.get(key, 0) + len(text)
        yield event({**head, "choices": [{"index": position * req.n + delta.index, "text": text,
                                          "logprobs": logprobs, "finish_reason": delta.finish_reason}]})
    if (req.stream_options or {}).get("include_usage"):
        yield event({**head, "choices": [], "usage": _total_usage(runs)})
    yield DONE

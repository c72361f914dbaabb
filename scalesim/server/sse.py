"""Server-sent events for streamed completions, primed so that bad requests still get a 4xx."""

import json
from collections.abc import AsyncIterator

from fastapi.responses import StreamingResponse

DONE = "data: [DONE]\n\n"


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def primed(stream: AsyncIterator):
    """Start `stream` and wait for its first item, so that errors raised on submission (prompt too
    long, unknown adapter) surface before the 200 is sent; return an iterator over all items."""
    first = await anext(stream)

    async def chain():
        yield first
        async for item in stream:
            yield item

    return chain()


def sse_response(events: AsyncIterator[str], headers: dict[str, str] | None = None) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", **(headers or {})})

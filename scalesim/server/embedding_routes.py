"""`/v1/embeddings` in OpenAI's shape, answered by the server's sentence embedder.

openai-python asks for base64 unless told otherwise: little-endian float32 bytes, which it decodes
with numpy. Inputs past the model's length are truncated (as sentence-transformers does); at most
`MAX_EMBEDDING_INPUTS` inputs per request, as OpenAI allows.
"""

import asyncio
import base64

from fastapi import APIRouter, Request

from scalesim.errors import InvalidRequestError
from scalesim.server.errors import APIError
from scalesim.server.protocol import EmbeddingRequest
from scalesim.server.state import server_state

router = APIRouter()
MAX_EMBEDDING_INPUTS = 2048


def _inputs(raw) -> list[str | list[int]]:
    """The request's inputs as a list of texts and token-id lists; a 400 for an empty one."""
    if isinstance(raw, str) or (raw and all(isinstance(t, int) for t in raw)):
        items = [raw]
    else:
        items = list(raw)
    if not items:
        raise APIError(400, "input must not be empty", param="input")
    if len(items) > MAX_EMBEDDING_INPUTS:
        raise APIError(400, f"at most {MAX_EMBEDDING_INPUTS} inputs per request, got {len(items)}", param="input")
    for i, item in enumerate(items):
        if isinstance(item, str) and not item:
            raise APIError(400, f"input[{i}] is an empty string", param="input")
    return items


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, request: Request):
    state = server_state(request)
    embedder = state.resolve_embedder(req.model)
    if req.dimensions is not None and req.dimensions != embedder.dimensions:
        raise APIError(400, f"{embedder.name} gives {embedder.dimensions} dimensions and cannot be shortened "
                            f"(it is not a Matryoshka model); got dimensions={req.dimensions}", param="dimensions")
    items = _inputs(req.input)
    try:
        vectors, tokens = await asyncio.to_thread(embedder.embed, items)  # off the loop: streams keep flowing
    except InvalidRequestError as exc:
        raise APIError(400, str(exc), param="input")
    if req.encoding_format == "base64":
        data = [base64.b64encode(v.numpy().astype("<f4").tobytes()).decode() for v in vectors]
    else:
        data = vectors.tolist()
    return {"object": "list", "model": req.model,
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "usage": {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}}

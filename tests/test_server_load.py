"""Load: many concurrent streaming clients over loopback, none lost (a bounded test)."""

import asyncio

from openai import AsyncOpenAI

from scalesim import AsyncLLM
from scalesim.server.config import ServerConfig
from tests.server_util import metric, running_server

CLIENTS = 200
TOKENS = 6


def test_200_concurrent_streaming_clients_all_complete():
    llm = AsyncLLM("tiny-random", kv_cache_memory="32MiB", block_size_tokens=4, max_num_seqs=64)
    with running_server(llm, ServerConfig("tiny-random")) as url:
        async def one(client: AsyncOpenAI, i: int) -> tuple[int, str | None]:
            stream = await client.chat.completions.create(
                model="tiny-random", messages=[{"role": "system", "content": f"Agent {i}."},
                                               {"role": "user", "content": f"Step {i % 7}: what now?"}],
                max_tokens=TOKENS, stream=True, extra_body={"ignore_eos": True, "agent_id": f"agent-{i}"})
            chunks, finish = 0, None
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content is not None:
                    chunks += 1
                finish = (chunk.choices[0].finish_reason if chunk.choices else None) or finish
            return chunks, finish

        async def main():
            # openai's default pool allows 1,000 connections, so all 200 streams are open at once.
            client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
            try:
                return await asyncio.gather(*(one(client, i) for i in range(CLIENTS)))
            finally:
                await client.close()

        results = asyncio.run(main())
        assert len(results) == CLIENTS
        assert all(finish == "length" for _, finish in results)
        assert all(chunks >= TOKENS for chunks, _ in results)  # the role chunk plus one per token
        assert metric(url, "scalesim_generation_tokens_total") == CLIENTS * TOKENS
        assert metric(url, "scalesim_num_requests_running") == 0

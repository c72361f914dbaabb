"""Load: many concurrent streaming clients over loopback, none lost, also while many leave (bounded tests)."""

import asyncio
import random
import socket
import time

from openai import AsyncOpenAI, OpenAI

from scalesim import AsyncLLM
from scalesim.server.config import ServerConfig
from tests.server_util import metric, running_server, server_connections

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


STORM_CLIENTS = 300
STORM_TOKENS = 8
PROMPTS = 6


def test_300_streams_with_30_percent_leaving_and_a_garbage_client_lose_nothing():
    """Faults and load in one run: the clients that stay get exactly the answer a quiet server
    gives, and afterwards nothing runs or waits, every page is free or cached, no socket is left.
    Of those that leave, half leave before their stream starts (still queued), half after a few
    tokens."""
    llm = AsyncLLM("tiny-random", dtype="fp32", kv_cache_memory="32MiB", block_size_tokens=4, max_num_seqs=64)
    config = ServerConfig("tiny-random", request_read_timeout_s=2.0)
    with running_server(llm, config) as url:
        port = int(url.rsplit(":", 1)[1])
        messages = [[{"role": "system", "content": f"You are agent {p}."},
                     {"role": "user", "content": f"Step {p}: what do you do?"}] for p in range(PROMPTS)]
        quiet = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        expected = [quiet.chat.completions.create(model="tiny-random", messages=m, max_tokens=STORM_TOKENS,
                                                  temperature=0, extra_body={"ignore_eos": True}
                                                  ).choices[0].message.content for m in messages]
        quiet.close()
        assert len(set(expected)) > 1 and all(expected)
        pages = metric(url, "scalesim_kv_blocks_free") + metric(url, "scalesim_kv_blocks_cached")
        connections = server_connections(port)
        rng = random.Random(13)
        plans = [(i % PROMPTS, rng.random() < 0.3, rng.choice([None, 1, 2, 3])) for i in range(STORM_CLIENTS)]

        async def one(client: AsyncOpenAI, prompt: int, leaves: bool, after_chunks: int | None):
            if leaves and after_chunks is None:  # gone before its stream starts
                try:
                    return await asyncio.wait_for(one(client, prompt, False, None), timeout=rng.uniform(0.01, 0.3))
                except TimeoutError:
                    return None
            stream = await client.chat.completions.create(
                model="tiny-random", messages=messages[prompt], max_tokens=STORM_TOKENS, temperature=0, stream=True,
                extra_body={"ignore_eos": True, "agent_id": f"agent-{prompt}"})
            text, chunks, finish = "", 0, None
            async for chunk in stream:
                chunks += 1
                if leaves and chunks > after_chunks:
                    await stream.close()
                    return None
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
            return text, finish

        async def garbage() -> list[bytes]:
            answers = []
            for sent in (b"\x00\xff\xfe garbage \r\n\r\n", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 5000\r\n\r\n{\"model\": ", b"GET /v1/models HTTP/1.1\r\n"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(sent)
                await writer.drain()
                answers.append(await asyncio.wait_for(reader.read(), 30))  # until the server closes it
                writer.close()
                await writer.wait_closed()
            return answers

        async def main():
            client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
            try:
                return await asyncio.gather(garbage(), *(one(client, *plan) for plan in plans))
            finally:
                await client.close()

        answers, *results = asyncio.run(main())
        assert answers[0].startswith(b"HTTP/1.1 400") and answers[1].startswith(b"HTTP/1.1 408") and \
            answers[2].startswith(b"HTTP/1.1 408")
        stayed = [(plan, result) for plan, result in zip(plans, results) if not plan[1]]
        assert len(stayed) > 150
        for (prompt, _, _), result in stayed:
            assert result == (expected[prompt], "length")
        deadline = time.monotonic() + 10
        while (metric(url, "scalesim_num_requests_running") or metric(url, "scalesim_num_requests_waiting")) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert metric(url, "scalesim_num_requests_running") == metric(url, "scalesim_num_requests_waiting") == 0
        assert metric(url, "scalesim_kv_blocks_free") + metric(url, "scalesim_kv_blocks_cached") == pages
        deadline = time.monotonic() + 10
        while server_connections(port) > connections and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server_connections(port) <= connections
        socket.create_connection(("127.0.0.1", port)).close()  # and it still accepts

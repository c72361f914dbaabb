"""Real frameworks' requests against the real built-in model: an OASIS replay, tool calls, JSON mode."""

import asyncio
import json

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from scalesim import AsyncLLM
from scalesim.server.config import ServerConfig
from scalesim.sim import oasis_requests as oasis
from tests.server_util import running_server

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
AGENTS = 4
STEPS = 3


@pytest.fixture(scope="module")
def url():
    # fp32 on every CPU: what the model answers (a JSON object closed within 80 tokens, a tool
    # call) is asserted below, and bf16 rounding moves those answers between kernels and machines
    llm = AsyncLLM(MODEL, kv_cache_memory="256MiB", dtype="fp32")
    with running_server(llm, ServerConfig(MODEL, default_max_tokens=24)) as base:
        yield base


def _check_reply(reply: dict) -> None:
    message = reply["choices"][0]["message"]
    for call in message.get("tool_calls") or []:
        assert call["type"] == "function" and call["function"]["name"] in oasis.NAMES
        assert isinstance(json.loads(call["function"]["arguments"]), dict)
        assert reply["choices"][0]["finish_reason"] == "tool_calls"
    if not message.get("tool_calls"):
        assert isinstance(message["content"], str)


def test_an_oasis_replay_is_served_and_each_profile_becomes_its_own_agent(url):
    client = AsyncOpenAI(base_url=url + "/v1", api_key="Not_Used", max_retries=0, timeout=180)
    histories = [[{"role": "system", "content": oasis.profile(i)}, {"role": "user", "content": oasis.feed(1, i)}]
                 for i in range(AGENTS)]

    agent_ids: list[set[str]] = [set() for _ in range(AGENTS)]

    async def step_all(step: int) -> list[dict]:
        raws = await asyncio.gather(*(client.chat.completions.with_raw_response.create(**oasis.request(h))
                                      for h in histories))
        for ids, raw in zip(agent_ids, raws):
            ids.add(raw.headers["x-agent-id"])
        return [raw.parse().model_dump() for raw in raws]

    async def run() -> list[list[dict]]:
        steps = []
        for step in range(1, STEPS + 1):
            replies = await step_all(step)
            steps.append(replies)
            for i, reply in enumerate(replies):
                histories[i] = oasis.next_history(histories[i], reply, step + 1, i)
        return steps

    steps = asyncio.run(run())
    for replies in steps:
        for reply in replies:
            _check_reply(reply)
    # Each later request extends the agent's previous one, so most of its prompt comes from the cache.
    for reply in steps[-1]:
        assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] > reply["usage"]["prompt_tokens"] // 2
    # Every profile is its own agent; the first call of the run has nothing to part from yet and is
    # named by its first sentence (private_spans' cold start), so one agent may have a second id.
    assert sum(len(ids) for ids in agent_ids) <= AGENTS + 1
    assert len(set.union(*agent_ids)) >= AGENTS
    for agent_id in set.union(*agent_ids):
        agent = httpx.get(f"{url}/v1/agents/{agent_id}").json()
        assert any(o["kind"] == "kv" for o in agent["objects"]), agent_id


def test_roles_that_do_not_alternate_are_accepted(url):
    messages = [{"role": "system", "content": oasis.profile(9)}, {"role": "user", "content": oasis.feed(1, 9)},
                {"role": "user", "content": oasis.feed(2, 9)}]
    response = httpx.post(url + "/v1/chat/completions", json=oasis.request(messages), timeout=180)
    assert response.status_code == 200, response.text
    _check_reply(response.json())


def test_the_models_tool_call_comes_back_as_tool_calls(url):
    client = OpenAI(base_url=url + "/v1", api_key="Not_Used", max_retries=0, timeout=180)
    reply = client.chat.completions.create(model=MODEL, messages=oasis.history_with_likes(2), tools=oasis.TOOLS, temperature=0,
                                           max_tokens=48)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "like_post" and "post_id" in json.loads(call.function.arguments)
    stream = client.chat.completions.create(model=MODEL, messages=oasis.history_with_likes(2), tools=oasis.TOOLS, temperature=0,
                                            max_tokens=48, stream=True)
    streamed = [c.choices[0].delta.tool_calls for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert streamed and streamed[0][0].function.name == "like_post"
    assert streamed[0][0].function.arguments == call.function.arguments
    plain = client.chat.completions.create(model=MODEL, messages=oasis.history_with_likes(2), tools=oasis.TOOLS, temperature=0,
                                           max_tokens=48, tool_choice="none")
    assert plain.choices[0].message.tool_calls is None


def test_json_mode_returns_a_json_object(url):
    client = OpenAI(base_url=url + "/v1", api_key="Not_Used", max_retries=0, timeout=180)
    messages = [{"role": "system", "content": "You are a werewolf game player. Always answer in JSON."},
                {"role": "user", "content": 'Vote for a player to eliminate. Answer with a JSON object with keys '
                                            '"vote" and "reason".'}]
    for temperature in (0, 0.7):
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=80, seed=1,
                                               temperature=temperature, response_format={"type": "json_object"})
        assert reply.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(reply.choices[0].message.content), dict)

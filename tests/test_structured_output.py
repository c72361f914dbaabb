"""Structured output on the real built-in model, through the official openai client: JSON schemas
whose outputs validate, forced tool calls (named and required) that are valid calls, streamed and
not, and replies cut by max_tokens that say "length" instead of passing as complete."""

import json

import httpx
import jsonschema
import pytest
from openai import OpenAI

from scalesim import AsyncLLM
from scalesim.server.config import ServerConfig
from scalesim.sim import oasis_requests as oasis
from tests.server_util import running_server

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"
VOTE = {"type": "object", "properties": {"vote": {"type": "string", "enum": ["Ana", "Ben", "Cleo"]},
                                         "confidence": {"type": "integer", "minimum": 0, "maximum": 10},
                                         "reasons": {"type": "array", "items": {"type": "string", "maxLength": 40},
                                                     "minItems": 1, "maxItems": 2}},
        "required": ["vote", "confidence", "reasons"], "additionalProperties": False}
WEREWOLF = [{"role": "user", "content": "You are Ana in a game of werewolf. Players: Ana, Ben, Cleo. Ben accused you "
                                        "last night. Who do you vote to eliminate, and why? Answer in JSON."}]
FEED = [{"role": "system", "content": oasis.profile(0)}, {"role": "user", "content": oasis.feed(1, 0)}]
PARAMETERS = {t["function"]["name"]: t["function"]["parameters"] for t in oasis.TOOLS}


@pytest.fixture(scope="module")
def client():
    llm = AsyncLLM(MODEL, kv_cache_memory="256MiB", dtype="fp32")
    with running_server(llm, ServerConfig(MODEL)) as base:
        yield OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


def _check_call(call, offered: list[str]) -> None:
    assert call.type == "function" and call.function.name in offered
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def _calls(client: OpenAI, stream: bool, **kwargs) -> tuple[list, str]:
    """The tool calls of a reply and its finish_reason, streamed or not."""
    if not stream:
        reply = client.chat.completions.create(**kwargs)
        return reply.choices[0].message.tool_calls or [], reply.choices[0].finish_reason
    chunks = [c for c in client.chat.completions.create(stream=True, **kwargs) if c.choices]
    return [c for chunk in chunks for c in chunk.choices[0].delta.tool_calls or []], chunks[-1].choices[0].finish_reason


@pytest.mark.parametrize("temperature", [0, 0.8])
def test_json_schema_output_validates(client, temperature):
    for seed in range(3):
        reply = client.chat.completions.create(
            model=MODEL, messages=WEREWOLF, temperature=temperature, seed=seed, max_tokens=120,
            response_format={"type": "json_schema", "json_schema": {"name": "vote", "schema": VOTE}})
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        jsonschema.validate(json.loads(reply.choices[0].message.content), VOTE)


def test_a_json_reply_cut_by_max_tokens_says_length(client):
    for response_format in ({"type": "json_object"},
                            {"type": "json_schema", "json_schema": {"name": "vote", "schema": VOTE}}):
        reply = client.chat.completions.create(model=MODEL, messages=WEREWOLF, temperature=0, max_tokens=5,
                                               response_format=response_format)
        choice = reply.choices[0]
        assert choice.finish_reason == "length" and reply.usage.completion_tokens == 5
        with pytest.raises(json.JSONDecodeError):
            json.loads(choice.message.content)


@pytest.mark.parametrize("stream", [False, True])
def test_a_named_tool_choice_returns_a_valid_call_of_that_function(client, stream):
    choice = {"type": "function", "function": {"name": "create_comment"}}
    calls, finish = _calls(client, stream, model=MODEL, messages=FEED, tools=oasis.TOOLS, tool_choice=choice,
                           temperature=0.8, seed=1, max_tokens=80)
    assert finish == "tool_calls" and len(calls) == 1
    assert calls[0].function.name == "create_comment"
    _check_call(calls[0], ["create_comment"])


def test_a_stop_string_cannot_cut_a_forced_call_into_text(client):
    calls, finish = _calls(client, False, model=MODEL, messages=FEED, tools=oasis.TOOLS, stop=["}", ","],
                           tool_choice={"type": "function", "function": {"name": "like_post"}}, temperature=0,
                           max_tokens=80)
    assert finish == "tool_calls" and [c.function.name for c in calls] == ["like_post"]
    _check_call(calls[0], ["like_post"])


@pytest.mark.parametrize("stream", [False, True])
def test_tool_choice_required_returns_valid_calls_of_offered_functions(client, stream):
    calls, finish = _calls(client, stream, model=MODEL, messages=FEED, tools=oasis.TOOLS, tool_choice="required",
                           temperature=0, max_tokens=120)
    assert finish == "tool_calls" and calls
    for call in calls:
        _check_call(call, oasis.NAMES)


def test_under_auto_a_started_tool_call_is_a_valid_one(client):
    called = 0
    for seed in range(4):
        reply = client.chat.completions.create(model=MODEL, messages=oasis.history_with_likes(0), tools=oasis.TOOLS,
                                               temperature=1.0, seed=seed, max_tokens=64)
        choice = reply.choices[0]
        for call in choice.message.tool_calls or []:
            _check_call(call, oasis.NAMES)
        called += bool(choice.message.tool_calls)
        if choice.finish_reason == "stop":  # text that opened a call block but is not a call would be a failure
            assert "<tool_call>" not in (choice.message.content or "")
    assert called  # the model did start calls, and each was valid


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"tools": oasis.TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice"),
    ({"tools": oasis.TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": oasis.TOOLS, "tool_choice": {"type": "function", "function": "create_post"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "not a schema"}}],
      "tool_choice": "required"}, "tools"),
])
def test_a_format_that_cannot_be_enforced_is_a_400_and_the_server_goes_on(client, body, param):
    url = str(client.base_url).rstrip("/")
    reply = httpx.post(url + "/chat/completions", json={"model": MODEL, "messages": WEREWOLF, "max_tokens": 4, **body})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param
    assert client.chat.completions.create(model=MODEL, messages=WEREWOLF, max_tokens=2).choices[0].message

"""Bad input gets an OpenAI-style error body and a 4xx, never a 500, and the server keeps serving."""

import asyncio
import time

import httpx
import pytest
from openai import AsyncOpenAI, OpenAI

from scalesim import AsyncLLM
from scalesim.server.config import ServerConfig
from tests.server_util import metric, running_server

MODEL = "tiny-random"
KEY = "sk-errors"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    llm = AsyncLLM(MODEL, kv_cache_memory="4MiB", block_size_tokens=4, max_model_len=256)
    config = ServerConfig(MODEL, api_key=KEY, default_max_tokens=8, max_body_nbytes=64 * 1024,
                          allowed_local_paths=[tmp_path_factory.mktemp("allowed")])
    with running_server(llm, config) as base:
        yield base


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"]
    return error


def _still_serves(url: str) -> None:
    ok = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, "max_tokens": 2},
                    headers=AUTH)
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("body, fragment", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "JSON object"),
])
def test_malformed_json_is_a_400(url, body, fragment):
    response = httpx.post(url + "/v1/chat/completions", content=body,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert fragment in _error(response, 400)["message"]
    _still_serves(url)


@pytest.mark.parametrize("field, value", [("max_tokens", "many"), ("temperature", "hot"), ("n", 1.5),
                                          ("messages", "hello"), ("stream", "yes"), ("top_p", 2.0),
                                          ("max_tokens", -1), ("n", 100), ("seed", "x")])
def test_wrong_types_and_ranges_are_a_400_naming_the_field(url, field, value):
    body = {"model": MODEL, "messages": CHAT, field: value}
    error = _error(httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH), 400)
    assert field in error["message"] or error["param"] == field
    _still_serves(url)


@pytest.mark.parametrize("messages", [[], [{"content": "no role"}], [{"role": "wizard", "content": "hi"}],
                                      [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]])
def test_empty_or_malformed_messages_are_a_400(url, messages):
    _error(httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": messages}, headers=AUTH), 400)


def test_prompt_over_the_context_is_a_400_not_a_retryable_error(url):
    long = " ".join(["word"] * 400)
    for stream in (False, True):
        response = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={
            "model": MODEL, "messages": [{"role": "user", "content": long}], "stream": stream})
        assert _error(response, 400)["code"] == "context_length_exceeded"
    response = httpx.post(url + "/v1/completions", headers=AUTH,
                          json={"model": MODEL, "prompt": "short", "max_tokens": 1000})
    assert _error(response, 400)["code"] == "context_length_exceeded"
    _still_serves(url)


@pytest.mark.parametrize("model", ["no-such-model", f"{MODEL}:no-such-adapter"])
def test_unknown_model_or_adapter_is_a_404(url, model):
    response = httpx.post(url + "/v1/chat/completions", json={"model": model, "messages": CHAT}, headers=AUTH)
    assert _error(response, 404)["code"] == "model_not_found"


def test_adapter_path_outside_the_allowed_directories_is_refused(url, tmp_path):
    for body in ({"id": "eve", "adapter_path": str(tmp_path)}, {"id": "eve", "model_path": "/etc"},
                 {"id": "eve", "adapter_path": "../../../../etc"}):
        error = _error(httpx.post(url + "/v1/agents", json=body, headers=AUTH), 400)
        assert "outside the allowed directories" in error["message"]
    assert httpx.get(url + "/v1/agents/eve", headers=AUTH).status_code == 404


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}])
def test_missing_or_wrong_api_key_is_a_401(url, headers):
    response = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT}, headers=headers)
    assert _error(response, 401)["code"] == "invalid_api_key"
    assert httpx.get(url + "/health").status_code == 200  # health and metrics stay open
    with pytest.raises(Exception, match="401"):
        OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_body_over_the_size_limit_is_a_413(url):
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 100_000}]}
    _error(httpx.post(url + "/v1/chat/completions", json=big, headers=AUTH), 413)

    def chunked():  # no Content-Length: the limit is enforced while the body streams in
        for _ in range(10):
            yield b"x" * 10_000
    _error(httpx.post(url + "/v1/chat/completions", content=chunked(), headers=AUTH), 413)
    _still_serves(url)


def test_hints_naming_unknown_agents_are_accepted_and_counted(url):
    before = metric(url, "scalesim_hinted_unknown_agents_total")
    response = httpx.post(url + "/v1/hints", json={"step": 1, "distances": {"nobody-1": 1, "nobody-2": 3}},
                          headers=AUTH)
    assert response.status_code == 200 and response.json()["unknown"] == 2
    assert metric(url, "scalesim_hinted_unknown_agents_total") == before + 2


@pytest.mark.parametrize("body", [{"distances": {"a": -1}}, {"distances": {"a": "soon"}}, {"step": -2},
                                  {"probabilities": {"a": 3}}, {"no_such_hint": 1}])
def test_malformed_hints_are_a_400(url, body):
    _error(httpx.post(url + "/v1/hints", json=body, headers=AUTH), 400)


def test_unknown_route_and_wrong_method_get_openai_error_bodies(url):
    _error(httpx.get(url + "/v1/nothing-here", headers=AUTH), 404)
    _error(httpx.get(url + "/v1/chat/completions", headers=AUTH), 405)


def test_forcing_a_tool_that_is_not_offered_is_refused_clearly(url):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"model": MODEL, "messages": CHAT, "tools": tools, "tool_choice": {"type": "function", "function": {"name": "g"}}}
    assert "tool_choice" in _error(httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH), 400)["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_pages(url):
    async def leave_early():
        client = AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        stream = await client.completions.create(model=MODEL, prompt="a long story", max_tokens=200, stream=True,
                                                 extra_body={"ignore_eos": True})
        async for _ in stream:
            break
        await stream.close()
        await client.close()

    asyncio.run(leave_early())
    deadline = time.monotonic() + 10
    while metric(url, "scalesim_num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(url, "scalesim_num_requests_running") == 0
    assert metric(url, "scalesim_kv_blocks_free") + metric(url, "scalesim_kv_blocks_cached") == \
        metric(url, "scalesim_kv_blocks_total")


@pytest.mark.parametrize("body", [
    {"n": 2, "seed": 2**64 - 1},                                                     # past torch's seed range
    {"messages": [{"role": "system", "content": [{"type": "text", "text": 1}]}, *CHAT]},  # a non-string part
    {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"function": "x"}]}, *CHAT]},
])
def test_odd_values_are_a_400_and_leave_the_engine_healthy(url, body):
    _error(httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT, **body}, headers=AUTH),
           400)
    _still_serves(url)


def test_json_mode_with_logprobs_returns_finite_numbers(url):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 6, "logprobs": True, "top_logprobs": 5,
            "response_format": {"type": "json_object"}}
    response = httpx.post(url + "/v1/chat/completions", json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    for token in response.json()["choices"][0]["logprobs"]["content"]:
        assert all(-10_000 <= t["logprob"] <= 0 for t in token["top_logprobs"])


def test_a_non_ascii_authorization_header_is_a_401(url):
    response = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": CHAT},
                          headers={"Authorization": "Bearer \xe9t\xe9".encode("latin-1")})
    _error(response, 401)


@pytest.mark.parametrize("body", [{"step": 1, "positions": {"a": [0, 0], "b": [3, 4]}, "speed": 1e-310},
                                  {"step": 10**400}])
def test_hints_that_overflow_are_a_400(url, body):
    import json
    response = httpx.post(url + "/v1/hints", content=json.dumps(body),
                          headers={**AUTH, "Content-Type": "application/json"})
    _error(response, 400)
    _still_serves(url)


def test_a_bad_path_or_an_unfillable_prefix_registers_nothing(url):
    _error(httpx.post(url + "/v1/agents", json={"id": "nul", "adapter_path": "/x/\u0000"}, headers=AUTH), 400)
    too_long = " ".join(["word"] * 400)  # over this server's 256-token context
    _error(httpx.post(url + "/v1/agents", json={"id": "verbose", "prefix": too_long}, headers=AUTH), 400)
    assert httpx.get(url + "/v1/agents/verbose", headers=AUTH).status_code == 404


def test_agent_ids_with_slashes_can_be_read_and_deleted(url):
    created = httpx.post(url + "/v1/agents", json={"id": "town/ada"}, headers=AUTH)
    assert created.status_code == 200, created.text
    assert httpx.get(url + "/v1/agents/town/ada", headers=AUTH).json()["id"] == "town/ada"
    assert httpx.delete(url + "/v1/agents/town/ada", headers=AUTH).status_code == 200

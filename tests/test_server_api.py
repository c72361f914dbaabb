"""The OpenAI API over HTTP, driven by the official openai client against a real uvicorn server."""

import json

import httpx
import pytest
from openai import OpenAI

from scalesim import AsyncLLM
from scalesim.server.config import ServerConfig
from tests.server_util import metrics, running_server

MODEL = "tiny-random"
API_KEY = "sk-test-key"
CHAT = [{"role": "system", "content": "You are Ada, a baker in a small town."},
        {"role": "user", "content": "What will you do today?"}]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    llm = AsyncLLM(MODEL, kv_cache_memory="16MiB", block_size_tokens=4)
    config = ServerConfig(MODEL, api_key=API_KEY, default_max_tokens=12, max_body_nbytes=256 * 1024)
    with running_server(llm, config) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_completion_returns_text_and_usage(client):
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content and choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 10


def test_the_engines_step_counters_are_on_metrics_and_grow_with_a_completion(url, client):
    """Steps, computed tokens and forward seconds tell an operator where the engine's time went
    (e.g. whether a burst was split over several steps)."""
    names = ("scalesim_steps", "scalesim_computed_tokens", "scalesim_forward_s", "scalesim_idle_s",
             "scalesim_prompt_tokens_total", "scalesim_cached_prompt_tokens", "scalesim_draft_tokens",
             "scalesim_accepted_draft_tokens")
    before = metrics(url, names)
    reply = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8, 9, 10], max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    after = metrics(url, names)
    grew = {n: after[n] - before[n] for n in names}
    assert reply.usage.completion_tokens == 4 and grew["scalesim_prompt_tokens_total"] == 6
    # the prompt in one step, then one step per further token, less one per drafted token kept
    assert grew["scalesim_steps"] == 4 - grew["scalesim_accepted_draft_tokens"]
    # the prompt's tokens not found cached, then one token per decode step and the drafted ones
    assert grew["scalesim_computed_tokens"] == (6 - grew["scalesim_cached_prompt_tokens"] + 3
                                                - grew["scalesim_accepted_draft_tokens"] + grew["scalesim_draft_tokens"])
    assert grew["scalesim_forward_s"] > 0


def test_streamed_chat_equals_the_unstreamed_reply(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10, temperature=0, stream=True,
                                           stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]


def test_n_with_a_seed_gives_n_reproducible_choices(client):
    kwargs = dict(model=MODEL, messages=CHAT, max_tokens=8, temperature=1.0, n=3, seed=7)
    first, second = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in second.choices]
    assert len(set(texts)) > 1


def test_stop_string_cuts_the_reply_before_it(client):
    full = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and full.startswith(cut.text)


def test_completions_take_several_prompts_and_token_ids_and_echo(client):
    reply = client.completions.create(model=MODEL, prompt=["hello there", "good morning"], n=2, max_tokens=4,
                                      temperature=0, logprobs=2)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.choices[0].text == reply.choices[1].text  # greedy: both completions agree
    assert len(reply.choices[0].logprobs.tokens) == len(reply.choices[0].logprobs.token_logprobs) > 0
    by_ids = client.completions.create(model=MODEL, prompt=[10, 11, 12, 13], max_tokens=3, temperature=0, echo=True)
    assert by_ids.usage.prompt_tokens == 4 and by_ids.choices[0].text


def test_streamed_completion_equals_the_unstreamed_one(client):
    whole = client.completions.create(model=MODEL, prompt="The river", max_tokens=10, temperature=0)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The river", max_tokens=10, temperature=0, stream=True))
    assert text == whole.choices[0].text


def test_missing_max_tokens_uses_the_server_default_cap(client):
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 12


def test_chat_logprobs_come_back_per_token(client):
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)


def test_json_mode_output_is_a_json_object_or_says_length(client):
    reply = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=40, temperature=0.8, seed=3,
                                           response_format={"type": "json_object"})
    text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert text.startswith("{")
    if finish == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert finish == "length" and reply.usage.completion_tokens == 40


@pytest.mark.parametrize("fields", [
    # Concordia (it asks for 5000, which this 4096-token model refuses as vLLM does; smollm2-135m has 8192)
    {"temperature": 1.0, "max_completion_tokens": 4000, "seed": None, "reasoning_effort": "low", "verbosity": "low"},
    # AgentVerse
    {"temperature": 0.7, "top_p": 1, "n": 1, "max_tokens": 100, "stop": None, "presence_penalty": 0,
     "frequency_penalty": 0},
    {"presence_penalty": 1.5, "frequency_penalty": -0.5, "repetition_penalty": 1.2, "min_p": 0.1, "logit_bias": {},
     "parallel_tool_calls": False},
])
def test_the_fields_real_frameworks_send_are_accepted(url, fields):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 3, **fields}
    # Concordia's max_completion_tokens lets the random model generate up to 4,000 tokens: seconds
    # on a slow CPU (past httpx's default 5 s on an AMX Xeon), so the wait is generous
    response = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                          timeout=120.0)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("field, value", [("presence_penalty", 3), ("frequency_penalty", -2.5), ("min_p", 1.5),
                                          ("repetition_penalty", 0)])
def test_a_penalty_out_of_range_is_a_400(url, field, value):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 3, field: value}
    response = httpx.post(url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 400 and field in response.json()["error"]["message"], response.text


def test_logit_bias_forces_a_token(client):
    reply = client.completions.create(model=MODEL, prompt="abc", max_tokens=3, temperature=0,
                                      logit_bias={"42": 100}, logprobs=0)
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].logprobs.token_logprobs == pytest.approx([0.0] * 3, abs=1e-3)

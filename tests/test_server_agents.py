"""Agent identity, the agent registry, hints over HTTP, and the simulation SDK."""

import time

import httpx
import pytest
from openai import OpenAI

from scalesim import AsyncLLM
from scalesim.server.config import ServerConfig
from scalesim.server.identity import message_texts
from scalesim.server.private_spans import PrivateSpans, segments
from scalesim.sim import Simulation, SimulationError
from tests.server_util import running_server

MODEL = "tiny-random"
PERSONA = "You are {name}, who lives in the old town and keeps a diary of every visitor. " * 3


def _chat(name: str) -> list[dict]:
    return [{"role": "system", "content": PERSONA.format(name=name)}, {"role": "user", "content": "Good morning!"}]


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory):
    from scalesim.weights.fixtures import make_random_adapters
    root = tmp_path_factory.mktemp("adapters")
    make_random_adapters(MODEL, root, count=2, rank=4)
    return root


@pytest.fixture(scope="module")
def url(adapters_dir):
    # A small device tier (128 pages of 4 tokens) so that agents' prefixes (~40 pages each) compete for it.
    # fp32 pinned: the page count is sized in fp32 pages (auto picks bf16 on some CPUs)
    llm = AsyncLLM(MODEL, dtype="fp32", kv_cache_memory="256KiB", block_size_tokens=4, host_memory="8MiB")
    config = ServerConfig(MODEL, allowed_local_paths=[adapters_dir], default_max_tokens=4)
    with running_server(llm, config) as base:
        yield base


def _agent(url: str, agent_id: str) -> httpx.Response:
    return httpx.get(f"{url}/v1/agents/{agent_id}")


def test_agent_id_comes_from_each_of_the_four_channels(url):
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    calls = {
        "by-body": dict(extra_body={"agent_id": "by-body"}),
        "by-user": dict(user="by-user"),
        "by-header": dict(extra_headers={"X-Agent-Id": "by-header"}),
    }
    for agent_id, extra in calls.items():
        client.chat.completions.create(model=MODEL, messages=_chat(agent_id), max_tokens=2, **extra)
    client.chat.completions.create(model=f"{MODEL}@by-alias", messages=_chat("by-alias"), max_tokens=2)
    for agent_id in (*calls, "by-alias"):
        objects = _agent(url, agent_id).json()["objects"]
        assert any(o["kind"] == "kv" for o in objects), agent_id


def test_the_first_channel_wins(url):
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    client.chat.completions.create(model=f"{MODEL}@w-alias", messages=_chat("w"), max_tokens=2, user="w-user",
                                   extra_body={"agent_id": "w-body"}, extra_headers={"X-Agent-Id": "w-header"})
    assert _agent(url, "w-body").status_code == 200
    assert [_agent(url, a).status_code for a in ("w-user", "w-header", "w-alias")] == [404, 404, 404]


def _inferred(url: str, messages: list[dict]) -> str:
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    return client.chat.completions.with_raw_response.create(model=MODEL, messages=messages,
                                                            max_tokens=2).headers["x-agent-id"]


def test_without_an_id_the_prompt_names_a_stable_anonymous_agent(url):
    first, other = _inferred(url, _chat("Nameless")), _inferred(url, _chat("Other"))
    assert first.startswith("anon-") and other.startswith("anon-") and first != other
    assert _inferred(url, _chat("Nameless")) == _inferred(url, _chat("Nameless") + [
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "And now?"}])
    assert _agent(url, first).status_code == 200


def test_inference_can_be_turned_off():
    llm = AsyncLLM(MODEL, kv_cache_memory="1MiB", block_size_tokens=4)
    with running_server(llm, ServerConfig(MODEL, infer_agents=False)) as base:
        reply = OpenAI(base_url=base + "/v1", api_key="none").chat.completions.with_raw_response.create(
            model=MODEL, messages=_chat("Ghost"), max_tokens=2)
        assert "x-agent-id" not in reply.headers
        would_be = PrivateSpans().agent_of(segments(message_texts(_chat("Ghost"))))  # a first call's id
        assert _agent(base, would_be).status_code == 404


def test_a_registered_persona_is_prefilled_and_reused(url):
    created = httpx.post(url + "/v1/agents", json={"id": "ada", "system": PERSONA.format(name="Ada")})
    assert created.status_code == 200, created.text
    assert created.json()["prefilled_tokens"] > 20
    reply = OpenAI(base_url=url + "/v1", api_key="none").chat.completions.create(
        model=MODEL, messages=_chat("Ada"), max_tokens=2, extra_body={"agent_id": "ada"})
    assert reply.usage.prompt_tokens_details.cached_tokens >= created.json()["prefilled_tokens"] - 4


def test_an_agent_with_an_adapter_runs_with_it_and_is_listed(url, adapters_dir):
    folder = sorted(adapters_dir.iterdir())[0]
    created = httpx.post(url + "/v1/agents", json={"id": "lena", "adapter_path": str(folder)})
    assert created.status_code == 200, created.text
    adapter = created.json()["adapter"]
    assert any(o["kind"] == "adapter" for o in created.json()["objects"])
    assert f"{MODEL}:{adapter}" in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    client = OpenAI(base_url=url + "/v1", api_key="none")
    prompt = "The weather today"
    base = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0).choices[0].text
    as_lena = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                        extra_body={"agent_id": "lena"}).choices[0].text
    by_name = client.completions.create(model=f"{MODEL}:{adapter}", prompt=prompt, max_tokens=6,
                                        temperature=0).choices[0].text
    assert as_lena == by_name != base


def test_deleting_an_agent_forgets_it(url):
    httpx.post(url + "/v1/agents", json={"id": "temp"}).raise_for_status()
    assert httpx.delete(url + "/v1/agents/temp").status_code == 200
    assert _agent(url, "temp").status_code == 404
    assert httpx.delete(url + "/v1/agents/temp").status_code == 404


def _tiers(url: str, agent_id: str) -> set[str]:
    return {o["tier"] for o in _agent(url, agent_id).json()["objects"]}


def test_hints_change_what_is_resident(url):
    names = [f"villager-{i}" for i in range(6)]
    for step, name in enumerate(names):  # six prefixes of ~40 pages each; the device holds 128 pages
        httpx.post(url + "/v1/agents", json={"id": name, "prefix": PERSONA.format(name=name)}).raise_for_status()
    first = names[0]
    assert _tiers(url, first) != {"device"}, "the first agent's prefix should have been pushed off the device"
    far = {name: 50 for name in names[1:]}
    response = httpx.post(url + "/v1/hints", json={"step": 1, "distances": {first: 0, **far}})
    assert response.status_code == 200 and response.json()["changed"] >= 1
    deadline = time.monotonic() + 15
    while _tiers(url, first) != {"device"} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _tiers(url, first) == {"device"}, "a hint of distance 0 should have prefetched it"
    assert _agent(url, first).json()["distance_steps"] == 0


def test_the_registry_survives_a_restart(tmp_path, adapters_dir):
    folder = str(sorted(adapters_dir.iterdir())[1])
    config = ServerConfig(MODEL, allowed_local_paths=[adapters_dir], state_dir=tmp_path)
    with running_server(AsyncLLM(MODEL, kv_cache_memory="1MiB", block_size_tokens=4), config) as base:
        httpx.post(base + "/v1/agents", json={"id": "mira", "adapter_path": folder,
                                              "prefix": "Mira keeps bees."}).raise_for_status()
        adapter = _agent(base, "mira").json()["adapter"]
    assert (tmp_path / "agents.sqlite").exists()
    with running_server(AsyncLLM(MODEL, kv_cache_memory="1MiB", block_size_tokens=4), config) as base:
        mira = _agent(base, "mira").json()
        assert mira["registered"] and mira["adapter"] == adapter and mira["adapter_path"] == folder
        kinds = {o["kind"] for o in mira["objects"]}
        assert kinds == {"adapter", "kv"}  # the adapter is loaded and the prefix pre-filled again


def test_the_sdk_registers_agents_sends_hints_and_binds_clients(url):
    with Simulation(url) as sim:
        assert sim.model == MODEL
        sim.add_agent("sdk-ann", system=PERSONA.format(name="Ann"))
        result = sim.step(3, distances={"sdk-ann": 0, "sdk-unknown": 2})
        assert result["step"] == 3 and result["unknown"] == 1
        assert sim.update(agent_data={"sdk-ann": 1}, timestep_data={2: ["sdk-ann"]}, timestep_cnt=4)["step"] == 4
        reply = sim.client("sdk-ann").chat.completions.create(model=sim.model, messages=_chat("Ann"), max_tokens=2)
        assert reply.usage.prompt_tokens_details.cached_tokens > 20  # its persona was pre-filled and reused
        assert sim.agent("sdk-ann")["distance_steps"] is not None
        with pytest.raises(SimulationError, match="404"):
            sim.agent("sdk-nobody")


@pytest.mark.parametrize("example", ["oasis_plain.py", "oasis_sdk.py"])
def test_the_examples_run_against_a_server(url, example):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent.parent / "examples" / example
    env = {**os.environ, "SCALESIM_URL": url, "SCALESIM_MODEL": MODEL}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) >= 3  # one line per active agent per step

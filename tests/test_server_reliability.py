"""No request can hurt another, abandoned work stops, every bad input is a 4xx (real uvicorn,
the official openai client and raw httpx / sockets)."""

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from safetensors.torch import load_file, save_file

from scalesim import AsyncLLM
from scalesim.server.background import free_port
from scalesim.server.config import ServerConfig
from scalesim.weights.fixtures import make_random_adapters
from tests.server_util import metric, running_server, server_connections

MODEL = "tiny-random"
CHAT = [{"role": "user", "content": "hello"}]
LONG = {"ignore_eos": True}


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    root = tmp_path_factory.mktemp("allowed")
    make_random_adapters(MODEL, root / "good", count=1, rank=4, seed=3)
    return root


@pytest.fixture(scope="module")
def served(allowed):
    llm = AsyncLLM(MODEL, dtype="fp32", kv_cache_memory="8MiB", block_size_tokens=4, max_model_len=4096)
    config = ServerConfig(MODEL, default_max_tokens=8, allowed_local_paths=[allowed], request_read_timeout_s=1.0,
                          send_timeout_s=1.0)
    with running_server(llm, config) as base:
        yield base, llm


@pytest.fixture(scope="module")
def url(served):
    return served[0]


def _client(url: str, **kwargs) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, **kwargs)


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def _wait_idle(url: str, within_s: float) -> float:
    """Seconds until nothing runs or waits (fails after `within_s`)."""
    started = time.monotonic()
    while metric(url, "scalesim_num_requests_running") or metric(url, "scalesim_num_requests_waiting"):
        assert time.monotonic() - started < within_s, "requests still in flight"
        time.sleep(0.02)
    return time.monotonic() - started


# --- one request never hurts another -----------------------------------------------------------

async def _bystander_and(url: str, poisoned: list[dict]) -> tuple[tuple[int, str], list]:
    """A long greedy stream, and the poisoned requests sent while it decodes; the poisoned
    replies must come back before the bystander finishes (so they shared its steps)."""
    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    decoding = asyncio.Event()
    finished_at: dict[str, float] = {}

    async def bystander() -> tuple[int, str]:
        stream = await client.completions.create(model=MODEL, prompt="a quiet story", max_tokens=300, stream=True,
                                                 temperature=0, extra_body=LONG,
                                                 stream_options={"include_usage": True})
        tokens, finish = 0, None
        async for chunk in stream:  # a chunk may carry several tokens (kept drafts)
            decoding.set()
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
        finished_at["bystander"] = time.monotonic()
        return tokens, finish

    async def poison(i: int, body: dict):
        await decoding.wait()
        try:
            return await client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, extra_body=body)
        finally:
            finished_at[f"poison-{i}"] = time.monotonic()

    try:
        results = await asyncio.gather(bystander(), *(poison(i, b) for i, b in enumerate(poisoned)),
                                       return_exceptions=True)
    finally:
        await client.close()
    if "bystander" in finished_at:
        assert all(t < finished_at["bystander"] for name, t in finished_at.items() if name != "bystander")
    return results[0], results[1:]


def test_extreme_sampling_values_neither_fail_nor_hurt_a_bystander(url):
    bystander, replies = asyncio.run(_bystander_and(url, [
        {"top_k": 2**63}, {"temperature": 1e-50}, {"top_k": 2**80, "temperature": 1e-300}]))
    assert bystander == (300, "length")
    for reply in replies:
        assert not isinstance(reply, Exception), reply
        assert reply.choices[0].finish_reason in ("length", "stop")


def test_a_sequence_whose_logits_are_not_finite_fails_alone(served, allowed):
    url, llm = served
    created = httpx.post(url + "/v1/agents", json={"id": "broken", "adapter_path": str(allowed / "good" / "adapter-0")})
    assert created.status_code == 200, created.text
    for a, b in llm.engine.weights.adapters[created.json()["adapter"]].weights.values():
        b.mul_(1e38)  # finite weights so large that its activations overflow
    bystander, replies = asyncio.run(_bystander_and(url, [{"agent_id": "broken", "temperature": 1.0},
                                                          {"agent_id": "broken", "temperature": 0}]))
    assert bystander == (300, "length")
    for reply in replies:
        assert isinstance(reply, openai.InternalServerError)
        assert "no usable logits" in reply.message
    _wait_idle(url, 5)
    ok = _client(url).chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_an_adapter_holding_nan_is_refused_at_load(url, allowed):
    folder = allowed / "nan"
    shutil.copytree(allowed / "good" / "adapter-0", folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    next(iter(tensors.values())).view(-1)[0] = float("nan")
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    error = _error(httpx.post(url + "/v1/agents", json={"id": "nan-agent", "adapter_path": str(folder)}), 400)
    assert "NaN or infinite" in error["message"]


# --- abandoned work stops, fan-out and the queue are bounded --------------------------------------

def _free_or_cached(url: str) -> float:
    return metric(url, "scalesim_kv_blocks_free") + metric(url, "scalesim_kv_blocks_cached")


def test_a_non_streamed_request_abandoned_by_its_client_stops(url):
    _wait_idle(url, 10)
    before, pages = metric(url, "scalesim_generation_tokens_total"), _free_or_cached(url)
    with pytest.raises(openai.APITimeoutError):
        _client(url, timeout=1).completions.create(model=MODEL, prompt="tell me everything", max_tokens=3000,
                                                   extra_body=LONG)
    assert _wait_idle(url, 2) < 2
    generated = metric(url, "scalesim_generation_tokens_total") - before
    assert generated < 3000
    time.sleep(0.3)
    assert metric(url, "scalesim_generation_tokens_total") - before == generated  # nothing more for nobody
    assert _free_or_cached(url) == pages


def test_fan_out_over_the_per_request_cap_is_a_400(url):
    body = {"model": MODEL, "prompt": ["a"] * 5, "n": 16, "max_tokens": 1}  # 80 sequences, over 64
    error = _error(httpx.post(url + "/v1/completions", json=body), 400)
    assert "80 sequences" in error["message"]
    body = {"model": MODEL, "prompt": ["a"] * 4, "n": 16, "max_tokens": 1}
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200


def test_past_max_waiting_a_request_gets_429_with_retry_after():
    llm = AsyncLLM(MODEL, kv_cache_memory="4MiB", block_size_tokens=4, max_num_seqs=1, max_waiting=2,
                   max_model_len=4096)
    with running_server(llm, ServerConfig(MODEL)) as base:
        async def main():
            client = AsyncOpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
            busy = []
            try:
                for i in range(3):  # one runs, two wait (one sequence at a time): the queue is full
                    busy.append(asyncio.create_task(client.completions.create(
                        model=MODEL, prompt=f"story {i}", max_tokens=3000, extra_body=LONG)))
                    deadline = time.monotonic() + 10
                    while llm.stats()["running"] + llm.stats()["waiting"] < i + 1:
                        assert time.monotonic() < deadline
                        await asyncio.sleep(0.01)
                assert llm.stats()["waiting"] == 2
                with pytest.raises(openai.RateLimitError) as refused:
                    await client.completions.create(model=MODEL, prompt="one more", max_tokens=4)
                return refused.value.response
            finally:
                for task in busy:
                    task.cancel()
                await asyncio.gather(*busy, return_exceptions=True)
                await client.close()

        response = asyncio.run(main())
        assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
        assert response.json()["error"]["code"] == "rate_limit_exceeded"
        _wait_idle(base, 10)
        assert httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": "again", "max_tokens": 2}
                          ).status_code == 200


# --- text, ids and limits ------------------------------------------------------------------------------

SURROGATE = "hi \\ud800"  # as JSON text: a lone surrogate


@pytest.mark.parametrize("route, body, field", [
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "%s"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "stream": true, '
                             '"user": "%s"}', "user"),
    ("/v1/chat/completions", '{"model": "%s@a", "messages": [{"role": "system", "content": "%s"}, '
                             '{"role": "user", "content": "hi"}]}', "messages.0.content"),
    ("/v1/chat/completions", '{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": '
                             '"function", "function": {"name": "%s", "parameters": {}}}]}', "tools.0.function.name"),
    ("/v1/completions", '{"model": "%s", "prompt": ["ok", "%s"]}', "prompt.1"),
    ("/v1/completions", '{"model": "%s", "prompt": "ok", "stream": true, "stop": ["%s"]}', "stop.0"),
    ("/v1/agents", '{"id": "sur-%s", "system": "%s"}', "system"),
    ("/v1/agents", '{"id": "sur-%s", "prefix": "%s"}', "prefix"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(url, route, body, field):
    response = httpx.post(url + route, content=(body % (MODEL, SURROGATE)).encode(),
                          headers={"Content-Type": "application/json"})
    error = _error(response, 400)
    assert error["param"] == field and "surrogate" in error["message"]


@pytest.mark.parametrize("agent_id", ["line\nbreak", "tab\there", "nul\x00", "bell\x07"])
def test_agent_ids_with_control_characters_or_too_long_are_a_400(url, agent_id):
    _error(httpx.post(url + "/v1/agents", json={"id": agent_id}), 400)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 1, "agent_id": agent_id}
    assert "agent_id" in _error(httpx.post(url + "/v1/chat/completions", json=body), 400)["message"]


def test_max_completion_tokens_zero_is_refused_not_ignored(url):
    body = {"model": MODEL, "messages": CHAT, "max_completion_tokens": 0}
    assert "max_tokens" in _error(httpx.post(url + "/v1/chat/completions", json=body), 400)["message"]
    body["max_completion_tokens"] = 3
    assert httpx.post(url + "/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] <= 3


# --- paths and weight folders -----------------------------------------------------------------------------

def _adapter_copy(allowed, name: str, config_edit=None, tensors_edit=None):
    folder = allowed / name
    shutil.copytree(allowed / "good" / "adapter-0", folder)
    if config_edit is not None:
        config = json.loads((folder / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config_edit(config)))
    if tensors_edit is not None:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        save_file(tensors_edit(tensors), str(folder / "adapter_model.safetensors"))
    return folder


def _with(config: dict, **changes) -> dict:
    return {**config, **changes}


@pytest.mark.parametrize("name, config_edit, tensors_edit, fragment", [
    ("r0", lambda c: _with(c, r=0), None, "r must be a positive integer"),
    ("rabc", lambda c: _with(c, r="abc"), None, "r must be a positive integer"),
    ("rnull", lambda c: _with(c, r=None), None, "r must be a positive integer"),
    ("alpha", lambda c: _with(c, lora_alpha="x"), None, "lora_alpha must be a positive number"),
    ("list", lambda c: [c], None, "must hold a JSON object"),
    ("targets", lambda c: _with(c, target_modules=5), None, "target_modules must be"),
    ("key", None, lambda t: {k.replace("layers.0.", "layers.abc."): v for k, v in t.items()}, "unexpected tensor"),
])
def test_bad_adapter_folders_are_a_400_naming_the_problem(url, allowed, name, config_edit, tensors_edit, fragment):
    folder = _adapter_copy(allowed, name, config_edit, tensors_edit)
    error = _error(httpx.post(url + "/v1/agents", json={"id": f"bad-{name}", "adapter_path": str(folder)}), 400)
    assert fragment in error["message"]
    assert httpx.get(url + f"/v1/agents/bad-{name}").status_code == 404


def test_a_private_model_whose_config_is_a_list_is_a_400(url, allowed):
    folder = allowed / "listmodel"
    folder.mkdir()
    (folder / "config.json").write_text("[1, 2]")
    error = _error(httpx.post(url + "/v1/agents", json={"id": "lm", "model_path": str(folder)}), 400)
    assert "JSON object" in error["message"]


def test_bad_paths_are_a_400_naming_the_path(url, allowed, tmp_path):
    loop = allowed / "loop"
    loop.symlink_to(loop)
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    leaky = _adapter_copy(allowed, "leaky")
    (leaky / "adapter_config.json").unlink()
    (leaky / "adapter_config.json").symlink_to(outside)  # a file inside an allowed folder, pointing out
    for path, fragment in ((str(loop), "not a usable path"), (str(allowed / ("x" * 300)), "cannot be read"),
                           (str(leaky), "outside the allowed directories")):
        error = _error(httpx.post(url + "/v1/agents", json={"id": "paths", "adapter_path": path}), 400)
        assert fragment in error["message"] and error["param"] == "adapter_path"


# --- connections, auth and hosts ---------------------------------------------------------------------------

@pytest.mark.parametrize("sent", [b"", b"GET /hea", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                                                  b"Content-Length: 100\r\n\r\n{\"model\""])
def test_a_client_that_sends_too_little_gets_408_and_is_closed(url, sent):
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(sent)
        started = time.monotonic()
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        assert time.monotonic() - started < 5  # the read timeout is 1 s
    assert received.startswith(b"HTTP/1.1 408")


def test_an_empty_api_key_is_refused_at_start_up():
    with pytest.raises(ValueError, match="empty"):
        ServerConfig(MODEL, api_key="")
    done = subprocess.run([sys.executable, "-m", "scalesim.cli", "serve", MODEL, "--port", str(free_port()),
                           "--api-key", ""],
                          capture_output=True, text=True, timeout=120)  # an unset $KEY
    assert done.returncode != 0 and "API key is empty" in done.stderr


def test_docs_follow_the_key_health_stays_open_metrics_on_request():
    key = {"Authorization": "Bearer sk-docs"}
    llm = AsyncLLM(MODEL, kv_cache_memory="2MiB", block_size_tokens=4)
    with running_server(llm, ServerConfig(MODEL, api_key="sk-docs"), shutdown_llm=False) as base:
        for path in ("/docs", "/openapi.json", "/redoc"):
            assert _error(httpx.get(base + path), 401)["code"] == "invalid_api_key"
            assert httpx.get(base + path, headers=key).status_code == 200
        assert httpx.get(base + "/health").status_code == 200
        assert httpx.get(base + "/metrics").status_code == 200
    with running_server(llm, ServerConfig(MODEL, api_key="sk-docs", metrics_require_key=True)) as base:
        _error(httpx.get(base + "/metrics"), 401)
        assert httpx.get(base + "/metrics", headers=key).status_code == 200
        assert httpx.get(base + "/health").status_code == 200


def test_a_foreign_host_header_is_refused():
    from scalesim.server.config import default_allowed_hosts
    assert default_allowed_hosts("0.0.0.0") is None and "localhost" in default_allowed_hosts("127.0.0.1")
    llm = AsyncLLM(MODEL, kv_cache_memory="2MiB", block_size_tokens=4)
    with running_server(llm, ServerConfig(MODEL, allowed_hosts=default_allowed_hosts("127.0.0.1"))) as base:
        port = base.rsplit(":", 1)[1]
        assert _error(httpx.get(base + "/v1/models", headers={"Host": "rebind.example"}), 400)["code"] == \
            "invalid_host"
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"):
            assert httpx.get(base + "/v1/models", headers={"Host": host}).status_code == 200


def test_stalled_and_pipelined_clients_are_closed_and_their_sockets_freed(url):
    port = int(url.rsplit(":", 1)[1])
    baseline = server_connections(port)
    sockets = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(20)]
    for i, sock in enumerate(sockets):
        if i % 2:
            sock.sendall(b"GET /health HTTP/1.1\r\n")  # never finished
        else:  # a whole request, then a pipelined one whose body never comes
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nPOST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: 100\r\n\r\n{")
    time.sleep(0.5)
    assert server_connections(port) >= baseline + 20
    for i, sock in enumerate(sockets):
        received = b""
        while chunk := sock.recv(4096):
            received += chunk
        assert b"HTTP/1.1 408" in received and (i % 2 or received.startswith(b"HTTP/1.1 200"))
        sock.close()
    deadline = time.monotonic() + 5
    while server_connections(port) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server_connections(port) <= baseline


def test_a_client_that_stops_reading_its_stream_is_closed_and_its_work_aborted(url):
    _wait_idle(url, 10)
    before = metric(url, "scalesim_generation_tokens_total")
    port = int(url.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it reads nothing: the buffers fill fast
    sock.connect(("127.0.0.1", port))
    body = json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 3900, "n": 16, "stream": True, "logprobs": 20,
                       "ignore_eos": True}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        _wait_idle(url, 30)
    finally:
        sock.close()
    assert metric(url, "scalesim_generation_tokens_total") - before < 16 * 3900 / 2

"""The disk tier under a real server: damaged files are detected, recomputed and counted in
/metrics; damaged SQLite files never stop the server from starting; a huge hint stalls nobody."""

import logging
import threading
import time

import httpx
import pytest

from scalesim.async_llm import AsyncLLM
from scalesim.server.config import ServerConfig
from tests.server_util import running_server

MODEL = "tiny-random"
PROMPT = "the old mill by the river keeps a ledger of every sack of grain that comes in "


def _engine(state_dir, **kwargs) -> AsyncLLM:
    args = dict(dtype="fp32", kv_cache_memory="64KiB", host_memory="0", block_size_tokens=4, disk_dir=str(state_dir))
    args.update(kwargs)
    return AsyncLLM(MODEL, **args)


def _complete(base: str, prompt: str, agent: str) -> dict:
    response = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 3,
                                                          "temperature": 0, "agent_id": agent}, timeout=60)
    response.raise_for_status()
    return response.json()


def _memory_metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(f'scalesim_memory{{name="{name}"}}'):
            return float(line.split()[-1])
    return 0.0


def _settled(llm: AsyncLLM) -> bool:
    deadline = time.monotonic() + 10
    while llm.engine.memory.tiers.staged and time.monotonic() < deadline:
        time.sleep(0.01)
    return not llm.engine.memory.tiers.staged


@pytest.mark.parametrize("damage", ["delete", "truncate", "swap"])
def test_disk_files_damaged_under_a_running_server_are_detected_recomputed_and_counted(tmp_path, damage):
    llm = _engine(tmp_path / "state")
    config = ServerConfig(MODEL, state_dir=tmp_path / "state")
    with running_server(llm, config) as base:
        prompts = [f"agent {i} remembers: {PROMPT}" for i in range(6)]
        expected = [_complete(base, p, f"a{i}")["choices"][0]["text"] for i, p in enumerate(prompts)]
        assert _settled(llm)
        store = llm.engine.memory.store
        paths = [store.path_of(key) for key, _, _ in store.entries("kv")]
        assert len(paths) >= 2, "the device is small: agents' pages went to disk"
        if damage == "delete":
            for path in paths:
                path.unlink()
        elif damage == "truncate":
            for path in paths:
                path.write_bytes(path.read_bytes()[:64])
        else:
            contents = [p.read_bytes() for p in paths]
            for path, data in zip(paths, contents[1:] + contents[:1]):
                path.write_bytes(data)
        again = [_complete(base, p, f"a{i}")["choices"][0]["text"] for i, p in enumerate(prompts)]
        assert again == expected, "damaged pages were recomputed, never served"
        assert _memory_metric(base, "corrupt") > 0
        assert httpx.get(base + "/health").status_code == 200


@pytest.mark.parametrize("registry", ["index.sqlite", "agents.sqlite"])
def test_a_corrupted_sqlite_file_is_set_aside_and_the_server_starts_and_serves(tmp_path, caplog, registry):
    state = tmp_path / "state"
    config = ServerConfig(MODEL, state_dir=state)
    with running_server(_engine(state), config) as base:
        httpx.post(base + "/v1/agents", json={"id": "miller", "prefix": PROMPT}).raise_for_status()
        _complete(base, PROMPT + " and then", "miller")
    (state / registry).write_bytes(b"this is not a database at all" * 100)
    for suffix in ("-wal", "-shm"):
        (state / f"{registry}{suffix}").unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING):
        restarted = _engine(state)
        if registry == "index.sqlite":
            kv = [key for key, _, _ in restarted.engine.memory.store.entries("kv")]
            assert kv, "the index was rebuilt from the files: the KV written at shutdown is still there"
        with running_server(restarted, config) as base:
            assert httpx.get(base + "/health").status_code == 200
            assert _complete(base, PROMPT + " and then", "miller")["choices"][0]["text"]
    assert "unreadable" in caplog.text
    assert list(state.glob(f"{registry}.corrupt-*"))


def test_a_hint_naming_600k_unknown_agents_is_quick_and_stalls_no_step():
    """The hint is parsed with no lock held and applied in chunks: another thread taking the
    memory manager's lock (as each engine step does) never waits long. (Over HTTP, the JSON parse
    of such a 13 MB body holds Python's GIL for a few hundred milliseconds on top.)"""
    from scalesim import LLM
    llm = LLM(MODEL, kv_cache_memory="4MiB", block_size_tokens=4)
    lock, waits, done = llm.engine.memory.lock, [], threading.Event()

    def stepper() -> None:
        while not done.is_set():
            started = time.perf_counter()
            with lock:
                waits.append(time.perf_counter() - started)
            time.sleep(0.001)

    thread = threading.Thread(target=stepper)
    thread.start()
    started = time.perf_counter()
    accepted = llm.hint(step=1, distances={f"stranger-{i}": i % 7 for i in range(600_000)})
    seconds = time.perf_counter() - started
    done.set()
    thread.join()
    print(f"hint {seconds:.2f} s, longest wait for the lock {max(waits) * 1e3:.1f} ms")
    assert accepted["unknown"] == 600_000 and len(llm.engine.tracker.untracked) <= 2 * 65_536
    assert seconds < 3.0 and max(waits) < 0.25

"""Scale-out on Ray Serve: two engine replicas (tiny-random) behind the ingress, on this machine.

One app for the module (about 20 s to start); the kill -9 test runs last, as it restarts a replica.
"""

import os
import signal
import time

import httpx
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

ray = pytest.importorskip("ray", reason="scale-out needs the ray extra (make test installs it)")

from scalesim.cli import _engine_args, build_parser  # noqa: E402
from scalesim.cluster.placement import SlotTable  # noqa: E402
from scalesim.server.background import free_port  # noqa: E402
from scalesim.sim import Simulation  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "tiny-random"
AGENTS = [f"villager-{i}" for i in range(12)]
PERSONA = "You are {name}, who keeps the mill by the river and remembers every traveller's face. " * 3


def _owner(agent_id: str, ranks=(0, 1)) -> int:
    return SlotTable().order(agent_id, list(ranks))[0]


def _chat(name: str) -> list[dict]:
    return [{"role": "system", "content": PERSONA.format(name=name)}, {"role": "user", "content": "Who passed today?"}]


def _args(port: int, state_dir, replicas: int = 2):
    # fp32, 4-token pages, a device tier of 256 KiB (128 pages) and no host tier: an agent's KV
    # goes to disk once a few others have called, so a restarted replica has disk-tier state to find
    return build_parser().parse_args([
        "serve", MODEL, "--replicas", str(replicas), "--port", str(port), "--replica-cpus", "0.5",
        "--embedding-model", "none", "--disk-dir", str(state_dir), "--dtype", "fp32", "--device-memory", "256KiB",
        "--kv-cache-memory", "256KiB", "--host-memory", "0", "--block-size", "4", "--default-max-tokens", "4"])


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def port():
    return free_port()


@pytest.fixture
def scaled_args(port, state_dir):
    return _args(port, state_dir, replicas=3)


@pytest.fixture(scope="module")
def url(port, state_dir):
    from ray import serve

    from scalesim.cluster.launch import start

    args = _args(port, state_dir)
    start(args, _engine_args(args))
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()


def _replica_of(client: OpenAI, agent_id: str, **extra) -> tuple[int, dict]:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=_chat(agent_id), max_tokens=2,
                                                           user=agent_id, **extra)
    return int(raw.headers["x-scalesim-replica"]), raw.parse().usage.model_dump()


def test_each_agent_is_served_by_its_owner_every_time_and_both_replicas_get_agents(url):
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    served = {agent: {_replica_of(client, agent)[0] for _ in range(2)} for agent in AGENTS}
    assert served == {agent: {_owner(agent)} for agent in AGENTS}
    assert {r for ranks in served.values() for r in ranks} == {0, 1}
    _, usage = _replica_of(client, AGENTS[0])
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0, "its prefix stayed on its replica"


def test_an_unnamed_agent_is_inferred_at_the_ingress_and_keeps_one_replica(url):
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    served = []
    for name in ("Oona", "Piet", "Oona", "Oona", "Piet"):  # a second agent makes the private part visible
        raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=_chat(name), max_tokens=2)
        served.append((name, raw.headers["x-agent-id"], int(raw.headers["x-scalesim-replica"])))
    later = served[1:]  # the first call, before any fork, is named by its first segment
    assert len({agent for name, agent, _ in later if name == "Oona"}) == 1
    assert {agent for name, agent, _ in later if name == "Oona"} != {agent for name, agent, _ in later if name == "Piet"}
    assert all(rank == _owner(agent) for _, agent, rank in later), later  # routed by the inferred id


def test_hints_are_split_by_owner_and_land_on_each_agents_replica(url):
    distances = {agent: float(i) for i, agent in enumerate(AGENTS)}
    result = httpx.post(f"{url}/v1/hints", json={"step": 3, "distances": distances}, timeout=60).json()
    expected = {str(rank): sum(_owner(a) == rank for a in AGENTS) for rank in (0, 1)}
    assert result["agents_by_replica"] == expected and result["agents"] == len(AGENTS)
    for agent, distance in distances.items():
        view = httpx.get(f"{url}/v1/agents/{agent}").json()
        assert view["replica"] == _owner(agent)
        assert view["distance_steps"] is not None and view["distance_steps"] <= distance  # min(hint, learned)
    turn = httpx.post(f"{url}/v1/hints", json={"step": 4, "turn_order": AGENTS[:4]}).json()
    assert turn["agents"] == 4, "a turn order relates agents: it is turned into distances before the split"
    paper = httpx.post(f"{url}/v1/update", json={"agent_data": {AGENTS[5]: 2}, "timestep_cnt": 5}).json()
    assert paper["agents"] == 1 and paper["step"] == 5


def test_bad_hints_get_the_single_servers_errors(url):
    for body in ({"step": -1}, {"distances": {"a": "far"}}, {"turn_order": "a"}):
        response = httpx.post(f"{url}/v1/hints", json=body)
        assert response.status_code == 400 and response.json()["error"]["message"], body
    assert httpx.post(f"{url}/v1/hints", content=b"{not json").status_code == 400


def test_the_sdk_works_unchanged_against_the_ingress(url):
    with Simulation(url) as sim:
        sim.add_agent("ada", system="You are Ada, a baker who rises before dawn.")
        assert sim.agent("ada")["replica"] == _owner("ada")
        sim.step(7, distances={"ada": 0, "bob": 3})
        reply = sim.client("ada").chat.completions.create(model=sim.model, max_tokens=2,
                                                          messages=[{"role": "user", "content": "Bread?"}])
        assert reply.choices[0].message.content is not None
        sim.remove_agent("ada")
        assert httpx.get(f"{url}/v1/agents/ada").json()["registered"] is False


def test_a_registered_agent_is_known_to_every_replica_and_its_owner_prefilled_it(url):
    created = httpx.post(f"{url}/v1/agents", json={"id": "brook", "system": PERSONA.format(name="Brook")},
                         timeout=60).json()
    assert created["replica"] == _owner("brook") and created["prefilled_tokens"] > 0
    assert created["registered"] is True and created["registered_on"] == [0, 1]
    other = 1 - created["replica"]
    text = httpx.get(f"{url}/metrics").text
    assert f'scalesim_requests_total{{replica="{other}",route="/v1/agents",status="200"}}' in text



def test_a_pinned_slot_sends_its_agents_to_the_pinned_replica_in_a_new_epoch(url):
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    agent = "wren"
    home = _owner(agent)
    assert _replica_of(client, agent)[0] == home
    before = httpx.get(f"{url}/v1/slots").json()
    pinned = httpx.post(f"{url}/v1/slots", json={"agent_id": agent, "replica": 1 - home}, timeout=60).json()
    assert pinned["epoch"] == before["epoch"] + 1 and pinned["replica"] == 1 - home
    assert pinned["moves"]["moved"] == 1 and pinned["moves"]["attached"] >= 1, "wren's state went first"
    rank, usage = _replica_of(client, agent)
    assert rank == 1 - home and _all_but_the_last_pages_cached(usage)
    assert httpx.get(f"{url}/v1/slots").json()["overrides"] == {str(pinned["slot"]): 1 - home}
    unpinned = httpx.delete(f"{url}/v1/slots/{pinned['slot']}", timeout=60).json()
    assert unpinned["epoch"] == pinned["epoch"] + 1 and httpx.get(f"{url}/v1/slots").json()["overrides"] == {}
    assert unpinned["moves"]["moved"] == 1, "and back to its rendezvous owner"
    rank, usage = _replica_of(client, agent)
    assert rank == home and _all_but_the_last_pages_cached(usage)
    assert httpx.post(f"{url}/v1/slots", json={"agent_id": agent, "replica": 7}).status_code == 400


def test_streaming_passes_through_the_ingress(url):
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    stream = client.chat.completions.create(model=MODEL, messages=_chat("Quill"), max_tokens=3, stream=True,
                                            user="Quill", stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 3


def test_metrics_label_each_replica_and_count_routing(url):
    text = httpx.get(f"{url}/metrics").text
    for rank in (0, 1):
        assert f'scalesim_requests_total{{replica="{rank}",route="/v1/chat/completions",status="200"}}' in text
        assert f'scalesim_requests_total{{replica="{rank}",route="/v1/agents/{{agent_id:path}}",status="200"}}' in text
        assert f'scalesim_routed_requests_total{{replica="{rank}"}}' in text
    assert "scalesim_live_replicas 2.0" in text and "scalesim_routing_spills_total" in text


def _replicas(url: str) -> dict[int, dict]:
    return {r["rank"]: r for r in httpx.get(f"{url}/v1/replicas", timeout=30).json()["data"]}


def _all_but_the_last_pages_cached(usage: dict) -> bool:
    """The whole prompt came from the cache but its last page or two (4-token pages; a request
    computes at least its last token) - not only the chat template every agent shares."""
    return usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 8


def _metric(url: str, name: str) -> str:
    return next(line.split()[-1] for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith(name + " "))


def _disk_nbytes(url: str, rank: int) -> float:
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "scalesim_memory" and sample.labels == {"replica": str(rank), "name": "disk_used_nbytes"}:
                return sample.value
    return 0.0


def test_scaling_to_three_replicas_moves_only_the_slots_the_new_rank_wins(url, scaled_args):
    from ray import serve

    from scalesim.cluster.launch import APP_NAME, build_serve_app

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    serve.run(build_serve_app(scaled_args, _engine_args(scaled_args)), name=APP_NAME, route_prefix="/")
    deadline = time.monotonic() + 120
    while sorted(_replicas(url)) != [0, 1, 2] and time.monotonic() < deadline:
        time.sleep(1)
    assert sorted(_replicas(url)) == [0, 1, 2]
    slots = httpx.get(f"{url}/v1/slots").json()["slots_by_replica"]
    assert 0.25 < slots["2"] / 4096 <= 0.40, slots  # rank 2 took about a third; ranks 0 and 1 kept the rest
    moved = [a for a in AGENTS if _owner(a, (0, 1, 2)) != _owner(a)]
    assert moved and all(_owner(a, (0, 1, 2)) == 2 for a in moved)  # only to the new rank
    # serve.run deploys a new version: Serve replaced every replica (ranks 0 and 1 found their KV
    # on disk, with its owners) and the ingress, which found the replicas and ran a rebalance; it
    # took the agents whose slots rank 2 won there, pages and all (this one waits for it)
    deadline = time.monotonic() + 30  # the ingress registers at rank 2 the agents the others know
    while (known := {r: d["agents"] for r, d in _replicas(url).items()})[2] < max(known[0], known[1]):
        assert time.monotonic() < deadline, known
        time.sleep(0.5)
    assert known[2] == known[0] == known[1] > 0
    rebalance = httpx.post(f"{url}/v1/rebalance", timeout=120).json()
    assert rebalance["failed"] == 0 and rebalance["errors"] == []
    assert float(_metric(url, "scalesim_routing_moves_total")) >= len(moved), "their state was moved"
    assert float(_metric(url, "scalesim_routing_moved_bytes_total")) > 0
    for agent in AGENTS + [f"newcomer-{i}" for i in range(9)]:  # the others stay where their state is
        rank, usage = _replica_of(client, agent)
        assert rank == _owner(agent, (0, 1, 2)), agent
        if agent in moved:
            assert _all_but_the_last_pages_cached(usage), f"{agent}'s pages came along to rank 2: {usage}"


def test_after_kill_9_the_next_ranked_replica_serves_and_the_restarted_one_gets_its_slots_and_disk_back(url):
    """Three replicas now (the scaling test ran first): the victim's agents go to their
    second-ranked replica, which differs between agents."""
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    victim, ranks = 1, (0, 1, 2)
    mine = [a for a in (f"miller-{i}" for i in range(60)) if _owner(a, ranks) == victim][:6]
    for agent in mine:  # six personas (about 52 pages each) overflow the 128-page device tier: the older go to disk
        _replica_of(client, agent)
    deadline = time.monotonic() + 30
    while _disk_nbytes(url, victim) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _disk_nbytes(url, victim) > 0
    old_pid = _replicas(url)[victim]["pid"]
    moves_before = float(_metric(url, "scalesim_routing_moves_total"))

    os.kill(old_pid, signal.SIGKILL)
    hinted = httpx.post(f"{url}/v1/hints", json={"step": 9, "distances": {a: 1 for a in mine}}, timeout=60)
    assert hinted.status_code == 200 and hinted.json()["agents"] == len(mine), "the dead replica's share went on"
    assert str(victim) not in hinted.json()["agents_by_replica"]
    for agent in mine:  # the first is retried by the ingress once the router knows the replica died
        rank, _ = _replica_of(client, agent)
        assert rank == SlotTable().order(agent, list(ranks))[1], agent
    assert "scalesim_routing_fallbacks_total 0.0" not in httpx.get(f"{url}/metrics").text

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        replicas = _replicas(url)
        if victim in replicas and replicas[victim]["pid"] != old_pid:
            break
        time.sleep(1)
    assert _replicas(url)[victim]["pid"] != old_pid, "Serve restarted the replica under its rank"
    assert _disk_nbytes(url, victim) > 0, "the restarted replica found its disk tier through the SQLite index"
    cached = []
    for agent in mine:
        deadline = time.monotonic() + 30
        while True:  # until the ingress's router has the restarted replica back
            rank, usage = _replica_of(client, agent)
            if rank == victim or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert rank == victim, "the agent's slot came home"
        cached.append(usage["prompt_tokens_details"]["cached_tokens"])
    assert max(cached) > 0, f"prefixes computed before the kill were read back from disk: {cached}"
    deadline = time.monotonic() + 30  # the replica's return started a rebalance: what the
    while float(_metric(url, "scalesim_routing_moves_total")) == moves_before:  # fallbacks computed comes home
        assert time.monotonic() < deadline, "no move after the victim came back"
        time.sleep(0.5)


def test_scaling_down_takes_in_the_removed_replicas_state_and_its_agents_keep_their_pages(url, port, state_dir):
    """Runs after the kill -9 test. serve.run deploys a new version with 2 replicas: Serve
    replaces the replicas (each persists its tiers as it stops) and starts two, which find
    folders 0 and 1 (`removed` is the rank of neither); the live replicas take folder `removed` in."""
    from ray import serve

    from scalesim.cluster.launch import APP_NAME, build_serve_app

    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
    args = _args(port, state_dir, replicas=2)
    serve.run(build_serve_app(args, _engine_args(args)), name=APP_NAME, route_prefix="/")
    deadline = time.monotonic() + 120
    while len(_replicas(url)) != 2:
        assert time.monotonic() < deadline, "Serve did not scale down"
        time.sleep(1)
    live = sorted(_replicas(url))
    removed = ({0, 1, 2} - set(live)).pop()
    while float(_metric(url, "scalesim_routing_adopted_bytes_total")) == 0:
        assert time.monotonic() < deadline, "the removed replica's state folder was not taken in"
        time.sleep(0.5)
    rebalance = httpx.post(f"{url}/v1/rebalance", timeout=120).json()  # waits for the one the adoption started
    assert rebalance["failed"] == 0, rebalance
    orphaned = [a for a in AGENTS if _owner(a, (0, 1, 2)) == removed]
    assert orphaned
    for agent in orphaned:
        rank, usage = _replica_of(client, agent)
        assert rank == _owner(agent, live) and _all_but_the_last_pages_cached(usage), (agent, rank, usage)


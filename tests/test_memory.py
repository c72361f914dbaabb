"""The memory layer: resident objects in three tiers under byte budgets, moved by invocation distance."""

import random

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalesim import LLM, SamplingParams
from scalesim.distance.tracker import DistanceTracker
from scalesim.engine.block_pool import BlockPool
from scalesim.memory.manager import MemoryManager
from scalesim.memory.policies import POLICIES
from scalesim.memory.resident import ResidentObject
from tests.conftest import random_prompt
from tests.test_radix_cache import _config

BLOCK = 4


class FakeWeights(ResidentObject):
    """A plain resident object of a given size: the manager never needs to know its kind."""

    kind = "soft_prompt"

    def __init__(self, name: str, nbytes: int, owners=()) -> None:
        super().__init__()
        self.name, self._nbytes, self._tier, self.pins = name, nbytes, "host", 0
        self.owners = set(owners)
        self.moves: list[str] = []

    key = property(lambda self: f"fake:{self.name}")
    nbytes = property(lambda self: self._nbytes)
    tier = property(lambda self: self._tier)
    pin_count = property(lambda self: self.pins)

    def move_to(self, tier: str) -> None:
        assert self.pins == 0 or tier == "device"
        self.moves.append(tier)
        self._tier = tier


def _manager(blocks: int = 16, host_nbytes: int = 10**9, policy: str = "scalesim") -> MemoryManager:
    config = _config()
    block_nbytes = config.kv_bytes_per_token * 4 * BLOCK
    pool = BlockPool(config, blocks * block_nbytes, BLOCK, torch.float32, "cpu")
    return MemoryManager(pool, DistanceTracker(), POLICIES[policy], host_nbytes, store=None)


def test_a_far_agents_state_is_evicted_before_a_near_agents():
    manager = _manager(blocks=8)
    block = manager.pool.block_nbytes
    near, far = FakeWeights("near", 4 * block, ["alice"]), FakeWeights("far", 4 * block, ["bob"])
    for obj in (near, far):
        manager.add(obj)
        assert manager.promote(obj)
    manager.agents_changed(manager.tracker.hint({"alice": 1, "bob": 50}))
    newcomer = FakeWeights("new", 4 * block, ["carol"])
    manager.add(newcomer)
    assert manager.promote(newcomer)
    assert near.tier == "device" and far.tier == "host"


def test_lru_evicts_the_least_recently_used_whatever_the_hints():
    manager = _manager(blocks=8, policy="lru")
    block = manager.pool.block_nbytes
    near, far = FakeWeights("near", 4 * block, ["alice"]), FakeWeights("far", 4 * block, ["bob"])
    for obj in (near, far):
        manager.add(obj)
        manager.promote(obj)
        manager.touch(obj, None)
    manager.agents_changed(manager.tracker.hint({"alice": 1, "bob": 50}))
    newcomer = FakeWeights("new", 4 * block)
    manager.add(newcomer)
    manager.promote(newcomer)
    assert near.tier == "host" and far.tier == "device"


def test_a_pinned_object_is_never_moved():
    manager = _manager(blocks=4)
    block = manager.pool.block_nbytes
    pinned = FakeWeights("pinned", 4 * block, ["alice"])
    manager.add(pinned)
    manager.promote(pinned)
    pinned.pins = 1
    manager.agents_changed(manager.tracker.hint({"alice": 1000}))
    other = FakeWeights("other", 2 * block, ["bob"])
    manager.add(other)
    assert not manager.promote(other), "no room can be made: the request waits"
    assert pinned.tier == "device" and pinned.moves == ["device"]


def test_a_shared_page_takes_its_nearest_owners_priority():
    manager = _manager(blocks=8)
    block = manager.pool.block_nbytes
    shared = FakeWeights("system-prompt", 4 * block, ["near", "far"])
    private = FakeWeights("private", 4 * block, ["middle"])
    for obj in (shared, private):
        manager.add(obj)
        manager.promote(obj)
    manager.agents_changed(manager.tracker.hint({"near": 1, "far": 100, "middle": 10}))
    manager.make_device_room(manager.pool.num_free + 4)
    assert shared.tier == "device" and private.tier == "host"


def test_prefetch_displaces_only_objects_of_farther_agents():
    manager = _manager(blocks=4)
    manager.prefetch_settings.max_prefetched_device_fraction = 1.0
    block = manager.pool.block_nbytes
    resident = FakeWeights("resident", 4 * block, ["bob"])
    wanted = FakeWeights("wanted", 4 * block, ["alice"])
    manager.add(resident)
    manager.promote(resident)
    manager.add(wanted)
    manager.agents_changed(manager.tracker.hint({"alice": 1, "bob": 1}))
    assert manager.prefetch_once() == 0, "equal distance: no swap"
    manager.agents_changed(manager.tracker.hint({"bob": 30}))
    assert manager.prefetch_once() == wanted.nbytes
    assert wanted.tier == "device" and resident.tier == "host"


OPERATIONS = st.lists(st.tuples(st.sampled_from(["add", "promote", "pin", "unpin", "hint", "evict", "prefetch"]),
                                st.integers(0, 7), st.integers(1, 6), st.integers(0, 40)), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPERATIONS)
def test_budgets_are_never_exceeded_under_random_operations(operations):
    """Random adds, loads, pins, hints, evictions and prefetches: no tier ever exceeds its budget
    and a pinned object never leaves the device."""
    host_nbytes = 10 * _manager().pool.block_nbytes
    manager = _manager(blocks=12, host_nbytes=host_nbytes)
    block = manager.pool.block_nbytes
    objects: dict[int, FakeWeights] = {}
    for op, index, size, distance in operations:
        obj = objects.get(index)
        if op == "add" and obj is None:
            objects[index] = obj = FakeWeights(str(index), size * block, [f"agent-{index}"])
            if manager.host_used + obj.nbytes > host_nbytes:
                obj.move_to("disk")
            manager.add(obj)
        elif op == "promote" and obj is not None:
            manager.promote(obj)
        elif op == "pin" and obj is not None and obj.tier == "device":
            obj.pins += 1
        elif op == "unpin" and obj is not None and obj.pins:
            obj.pins -= 1
        elif op == "hint":
            manager.agents_changed(manager.tracker.hint({f"agent-{index}": distance}))
        elif op == "evict":
            manager.make_device_room(manager.pool.num_free + size)
        elif op == "prefetch":
            manager.prefetch_once()
        device_bytes = sum(o.nbytes for o in objects.values() if o.tier == "device")
        assert device_bytes <= manager.pool.num_blocks * block
        assert manager.host_used == sum(o.nbytes for o in objects.values() if o.tier == "host") <= host_nbytes
        assert all(o.tier == "device" for o in objects.values() if o.pins)
        assert manager.prefetched_nbytes == sum(o.nbytes for o in objects.values() if getattr(o, "prefetched", False))


# --- through the engine ---------------------------------------------------------------------

def _llm(tmp_path=None, **kwargs) -> LLM:
    args = dict(device_memory="96KiB", host_memory="64MiB", block_size_tokens=4, max_num_batched_tokens=256)
    if tmp_path is not None:
        args["disk_dir"] = str(tmp_path / "state")
    args.update(kwargs)
    return LLM("tiny-random", **args)


def _prefix(seed: int, length: int = 60) -> list[int]:
    return random_prompt(random.Random(seed), length)


def test_with_an_accurate_hint_a_prefetched_agent_needs_no_load_on_the_critical_path():
    llm = _llm()
    params = SamplingParams(max_tokens=2, temperature=0)
    prompts = {f"agent-{i}": _prefix(i) for i in range(6)}
    for agent, prompt in prompts.items():
        llm.generate([prompt], params, agent_ids=[agent])  # the pool holds about two agents
    llm.engine.hint(step=1, distances={"agent-0": 0, **{a: 40 for a in prompts if a != "agent-0"}})
    llm.engine.memory.prefetch_once()
    before = llm.engine.memory_stats()
    out = llm.generate([prompts["agent-0"] + [7, 8]], params, agent_ids=["agent-0"])[0]
    after = llm.engine.memory_stats()
    assert out.num_cached_tokens >= 56
    assert after.get("on_demand_loads", 0) == before.get("on_demand_loads", 0)
    assert after["stall_s"] == before["stall_s"]
    assert after.get("prefetch_used", 0) > before.get("prefetch_used", 0)


def test_without_a_hint_the_same_request_loads_its_pages_on_demand():
    llm = _llm()
    params = SamplingParams(max_tokens=2, temperature=0)
    prompts = {f"agent-{i}": _prefix(i) for i in range(6)}
    for agent, prompt in prompts.items():
        llm.generate([prompt], params, agent_ids=[agent])
    out = llm.generate([prompts["agent-0"] + [7, 8]], params, agent_ids=["agent-0"])[0]
    stats = llm.engine.memory_stats()
    assert out.num_cached_tokens >= 56
    assert stats.get("on_demand_loads", 0) > 0


def test_kv_demoted_to_disk_is_found_after_a_restart_through_the_sqlite_index(tmp_path):
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    first = _llm(tmp_path, host_memory=0)
    prompts = [_prefix(i) for i in range(6)]
    expected = [o.outputs[0].token_ids for o in first.generate(prompts, params)]
    assert first.engine.memory_stats()["disk_used_nbytes"] > 0
    first.engine.shutdown()
    restarted = _llm(tmp_path, host_memory=0)
    out = restarted.generate([prompts[0]], params)[0]
    assert out.num_cached_tokens >= 56, "the pages came back from disk instead of being recomputed"
    assert out.outputs[0].token_ids == expected[0]


def test_a_corrupted_disk_file_is_detected_and_recomputed_never_served(tmp_path):
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    llm = _llm(tmp_path, host_memory=0)
    prompts = [_prefix(i) for i in range(6)]
    expected = llm.generate([prompts[0]], params)[0].outputs[0].token_ids
    llm.generate(prompts[1:], params)
    store = llm.engine.memory.store
    for key, _, meta in store.entries("kv"):
        path = store.path_of(key)
        data = bytearray(path.read_bytes())
        data[-8:] = b"\x00\x01\x02\x03\x04\x05\x06\x07"
        path.write_bytes(bytes(data))
    out = llm.generate([prompts[0]], params)[0]
    assert out.outputs[0].token_ids == expected
    assert llm.engine.memory_stats().get("corrupt", 0) > 0


def test_every_tier_full_of_pinned_state_makes_a_request_wait_not_crash():
    llm = _llm(device_memory="24KiB", host_memory=0)
    engine = llm.engine
    long = engine.add_request(_prefix(1, 28), SamplingParams(max_tokens=12, ignore_eos=True), agent_id="a")
    other = engine.add_request(_prefix(2, 28), SamplingParams(max_tokens=12, ignore_eos=True), agent_id="b")
    finished = set()
    for _ in range(400):
        for delta in engine.step():
            if delta.finished:
                finished.add(delta.request_id)
        if not engine.has_unfinished():
            break
    assert finished == {long, other}


def test_memory_stats_report_counters_per_tier_and_kind():
    llm = _llm()
    params = SamplingParams(max_tokens=2, temperature=0)
    for i in range(6):
        llm.generate([_prefix(i)], params, agent_ids=[f"agent-{i}"])
    llm.generate([_prefix(0)], params, agent_ids=["agent-0"])
    stats = llm.engine.memory_stats()
    for key in ("device_used_nbytes", "host_used_nbytes", "stall_s", "bytes_out", "evicted", "policy"):
        assert key in stats, key
    assert stats["device_used_nbytes"] <= stats["device_budget_nbytes"]


# --- invocation distance and hints ----------------------------------------------------------

def test_distances_decay_by_one_per_step_and_a_request_sets_zero():
    tracker = DistanceTracker()
    tracker.hint({"alice": 5})
    tracker.advance(2)
    assert tracker.distance("alice") == 3
    tracker.on_request("alice")
    assert tracker.distance("alice") == 0
    tracker.on_finish("alice")
    assert tracker.distance("alice") == 3, "the hint still lies in the future"


def test_without_hints_the_learned_fallback_uses_the_agents_own_inter_arrival_time():
    now = [0.0]
    tracker = DistanceTracker(clock=lambda: now[0])
    for t in (0.0, 10.0, 20.0):
        now[0] = t
        tracker.on_request("bob")
        tracker.on_finish("bob")
    now[0] = 25.0
    assert tracker.distance("bob") == pytest.approx(5.0 / tracker.seconds_per_step)
    assert tracker.distance("stranger") == float("inf")


def test_an_overdue_agent_is_expected_a_period_later_not_any_moment():
    now = [0.0]
    tracker = DistanceTracker(clock=lambda: now[0])
    for t in (0.0, 10.0, 20.0):  # every 10 s; then it goes quiet
        now[0] = t
        tracker.on_request("bob")
        tracker.on_finish("bob")
    now[0] = 36.0  # due at 30 s, missed: next due at 40 s
    assert tracker.distance("bob") == pytest.approx(4.0 / tracker.seconds_per_step)
    assert tracker.distance("bob") > 0


def test_estimators_combine_by_minimum():
    from scalesim.engine.hints import estimate_distances
    d = estimate_distances(10, distances={"a": 7}, schedule={"a": 12, "b": 30}, turn_order=["c", "b"],
                           probabilities={"d": 0.25}, active=["e"], frontier=["f"], graph={"f": ["g"], "g": ["h"]},
                           positions={"i": [0, 0], "j": [0, 4]}, speed=1.0, cooldowns={"j": 9})
    assert d == {"a": 2, "b": 1, "c": 0, "d": 4.0, "e": 0, "f": 0, "g": 1, "h": 2, "i": 2, "j": 9}


def test_the_papers_update_shape_is_accepted(tiny_llm):
    accepted = tiny_llm.hint(agent_data={"x": 3}, timestep_data={"1": ["y", "z"]}, timestep_cnt=4)
    assert accepted["step"] >= 4 and accepted["agents"] == 3
    assert tiny_llm.engine.tracker.distance("y") == 1


def test_hints_naming_unknown_agents_are_accepted_and_counted(tiny_llm):
    before = tiny_llm.memory_stats().get("hinted_unknown_agents", 0)
    tiny_llm.hint(distances={"nobody-1": 1, "nobody-2": 2})
    assert tiny_llm.memory_stats()["hinted_unknown_agents"] == before + 2


@pytest.mark.parametrize("hints", [{"distances": {"a": -1}}, {"distances": ["a"]}, {"probabilities": {"a": 2}},
                                   {"turn_order": "abc"}, {"positions": {"a": [1]}}, {"step": -3}])
def test_bad_hints_get_a_clear_error(tiny_llm, hints):
    from scalesim.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError):
        tiny_llm.hint(**hints)


def test_a_registered_agent_runs_with_its_adapter_and_prefilled_persona(tmp_path):
    from scalesim.weights.fixtures import make_random_adapters
    folder = make_random_adapters("tiny-random", tmp_path, count=1, rank=4)[0]
    llm = LLM("tiny-random", kv_cache_memory="4MiB", block_size_tokens=4)
    persona = "I am Isabella and I run the cafe in the village with my friend Maria"
    llm.register_agent("isabella", adapter=str(folder), prefix=persona)
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    ids = llm.tokenizer.encode(persona + " today I will")
    by_agent = llm.generate([ids], params, agent_ids=["isabella"])[0]
    assert by_agent.num_cached_tokens >= 12, "the persona was pre-filled under the agent's adapter"
    assert by_agent.outputs[0].token_ids == llm.generate([ids], params, adapters=[str(folder)])[0].outputs[0].token_ids
    assert by_agent.outputs[0].token_ids != llm.generate([ids], params)[0].outputs[0].token_ids


def test_adapters_and_kv_compete_for_one_device_budget(tmp_path):
    from scalesim.weights.fixtures import make_random_adapters
    folders = make_random_adapters("tiny-random", tmp_path, count=3, rank=8)
    llm = LLM("tiny-random", device_memory="160KiB", block_size_tokens=4)
    for i, folder in enumerate(folders):
        llm.register_agent(f"agent-{i}", adapter=str(folder))
    adapter_nbytes = llm.engine.weights.adapters[str(folders[0])].nbytes
    assert 2 * adapter_nbytes < 160 * 1024 < 3 * adapter_nbytes + 160 * 1024
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    for i in range(3):
        llm.generate([_prefix(i, 20)], params, agent_ids=[f"agent-{i}"])
    llm.hint(step=1, distances={"agent-0": 0, "agent-1": 30, "agent-2": 30})
    llm.engine.memory.prefetch_once()
    weights = llm.engine.weights.adapters
    assert weights[str(folders[0])].tier == "device"
    stats = llm.memory_stats()
    assert stats["device_used_nbytes"] <= stats["device_budget_nbytes"]
    assert stats.get("evicted.adapter.device", 0) > 0, "an adapter was demoted to make room"


def test_a_heap_entry_discarded_earlier_never_comes_back():
    from scalesim.memory.heap import MaxHeap
    heap = MaxHeap()
    heap.push("a", (100,))
    heap.discard("a")
    heap.push("a", (1,))
    heap.push("b", (50,))
    assert heap.pop() == ("b", (50,))
    assert heap.pop() == ("a", (1,))
    assert heap.pop() is None


def test_making_room_never_evicts_the_object_being_loaded():
    manager = _manager(blocks=2, host_nbytes=_manager().pool.block_nbytes)
    block = manager.pool.block_nbytes
    old = FakeWeights("old", block, ["a"])
    manager.add(old)
    manager.touch(old, None)
    on_device = FakeWeights("on-device", 2 * block, ["b"])
    on_device.move_to("disk")
    manager.add(on_device)
    assert manager.promote(on_device)
    assert manager.promote(old), "loading `old` may demote `on-device`, never `old` itself"
    assert old.tier == "device" and old.moves == ["device"]


def test_a_weight_file_that_went_missing_fails_its_requests_and_leaks_nothing(tmp_path):
    import shutil
    from scalesim.weights.fixtures import make_random_adapters
    folder = make_random_adapters("tiny-random", tmp_path, count=1, rank=4)[0]
    llm = LLM("tiny-random", device_memory="256KiB", block_size_tokens=4)
    llm.add_adapter("a", str(folder))
    adapter = llm.engine.weights.adapters["a"]
    adapter.move_to("disk")  # as the manager does for a cold adapter (its files are the truth)
    llm.engine.memory.remove(adapter)
    llm.engine.memory.add(adapter)
    shutil.rmtree(folder)
    free = llm.engine.pool.num_free
    out = llm.generate(["hello"], SamplingParams(max_tokens=2), adapters=["a"])[0]
    assert out.outputs[0].finish_reason == "error"
    assert llm.engine.pool.num_free == free
    assert llm.generate(["hello"], SamplingParams(max_tokens=2))[0].outputs[0].finish_reason == "length"


def test_disk_objects_of_another_page_size_are_not_restored(tmp_path):
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    first = _llm(tmp_path, host_memory=0)
    first.generate([_prefix(i) for i in range(6)], params)
    first.engine.shutdown()
    other = _llm(tmp_path, host_memory=0, block_size_tokens=8)
    assert other.engine.memory.store.entries("kv") == []
    assert other.generate([_prefix(0)], params)[0].num_cached_tokens == 0


def test_waiting_requests_load_in_order_and_never_evict_each_others_state():
    manager = _manager(blocks=8)
    block = manager.pool.block_nbytes
    a1, a2, b1 = (FakeWeights(n, 4 * block, [o]) for n, o in (("a1", "ann"), ("a2", "ann"), ("b1", "ben")))
    for obj in (a1, a2, b1):
        manager.add(obj)
    manager.request_group(1, [a1, a2])
    manager.request_group(2, [b1])
    assert manager.serve_on_demand() == 2
    assert (a1.tier, a2.tier, b1.tier) == ("device", "device", "host"), "b waits: a's loads are held for a"
    assert manager.loads_pending
    manager.release_group(1)  # request a was admitted and has finished
    assert manager.serve_on_demand() == 1 and b1.tier == "device" and not manager.loads_pending


def test_a_prefetch_never_displaces_state_needed_in_the_same_step_whatever_the_recency():
    manager = _manager(blocks=4)
    manager.prefetch_settings.max_prefetched_device_fraction = 1.0
    block = manager.pool.block_nbytes
    resident, wanted = FakeWeights("resident", 4 * block, ["bob"]), FakeWeights("wanted", 4 * block, ["alice"])
    manager.add(resident)
    manager.promote(resident)
    manager.add(wanted)
    resident.last_use_s, wanted.last_use_s = 0.0, 100.0  # the tie-breaker alone would put resident out
    manager.agents_changed(manager.tracker.hint({"alice": 1, "bob": 1}))
    assert manager.prefetch_once() == 0 and resident.tier == "device"


def test_a_prefetch_pushed_out_unused_is_not_retried_in_the_same_step():
    manager = _manager(blocks=4)
    manager.prefetch_settings.max_prefetched_device_fraction = 1.0
    block = manager.pool.block_nbytes
    wanted = FakeWeights("wanted", 4 * block, ["alice"])
    manager.add(wanted)
    manager.agents_changed(manager.tracker.hint({"alice": 1}))
    assert manager.prefetch_once() == wanted.nbytes
    assert manager.make_device_room(manager.pool.num_blocks) and wanted.tier == "host"  # pushed out unused
    assert manager.prefetch_once() == 0
    manager.agents_changed(manager.tracker.advance(1))
    manager.agents_changed(manager.tracker.hint({"alice": 1}))
    assert manager.prefetch_once() == wanted.nbytes

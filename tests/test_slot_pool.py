"""SGLang's LoRA pool, as the `sglang` baselines run it: a fixed set of device slots, LRU."""

import pytest

from scalesim import LLM, SamplingParams
from scalesim.memory.slot_pool import SGLANG_MAX_LORAS_PER_BATCH
from scalesim.weights.fixtures import make_random_adapters
from tests.memory_util import Clock, FakeWeights, make_manager

SLOTS = SGLANG_MAX_LORAS_PER_BATCH


class FakeAdapter(FakeWeights):
    kind = "adapter"


def _sglang(blocks: int = 64, clock: Clock | None = None):
    return make_manager(blocks=blocks, host_nbytes=0, policy="sglang", clock=clock or Clock())


def _placed(manager, count: int, clock: Clock) -> list[FakeAdapter]:
    adapters = []
    for i in range(count):
        clock.now_s += 1
        adapter = FakeAdapter(f"a{i}", manager.pool.block_nbytes, owners=[f"agent-{i}"])
        manager.place(adapter)
        adapters.append(adapter)
    return adapters


def test_the_slot_area_comes_out_of_the_device_and_holds_at_most_eight_adapters():
    clock = Clock()
    manager = _sglang(clock=clock)
    free_before = manager.pool.num_free
    adapters = _placed(manager, SLOTS + 2, clock)
    assert manager.pool.num_free == free_before - SLOTS  # 8 slots of one block, reserved once
    on_device = [a for a in adapters if a.tier == "device"]
    assert len(on_device) == SLOTS
    # the host tier has a budget of 0 bytes, yet every adapter keeps a host copy, as in SGLang
    assert all(a.tier == "host" for a in adapters if a not in on_device)
    assert manager.usage()["host"] == 0


def test_a_missing_adapter_replaces_the_least_recently_used_slot_nobody_uses():
    clock = Clock()
    manager = _sglang(clock=clock)
    adapters = _placed(manager, SLOTS + 1, clock)
    resident = sorted((a for a in adapters if a.tier == "device"), key=lambda a: a.last_use_s)
    waiting = next(a for a in adapters if a.tier == "host")
    oldest, second = resident[0], resident[1]
    oldest.pins = 1  # a running request uses the oldest: it stays
    clock.now_s += 1
    assert manager.promote(waiting)
    assert oldest.tier == "device" and second.tier == "host"


def test_no_slot_can_be_taken_while_every_slot_is_in_use():
    clock = Clock()
    manager = _sglang(clock=clock)
    adapters = _placed(manager, SLOTS + 1, clock)
    for adapter in adapters:
        if adapter.tier == "device":
            adapter.pins = 1
    waiting = next(a for a in adapters if a.tier == "host")
    assert not manager.promote(waiting)
    assert waiting.tier == "host"


def test_kv_room_never_evicts_an_adapter_and_adapters_never_evict_other_state():
    clock = Clock()
    manager = _sglang(blocks=24, clock=clock)
    adapters = _placed(manager, SLOTS, clock)
    others = []
    for i in range(manager.pool.num_free):
        clock.now_s += 1
        obj = FakeWeights(f"w{i}", manager.pool.block_nbytes, owners=[f"other-{i}"])
        manager.place(obj)
        others.append(obj)
    assert all(o.tier == "device" for o in others) and manager.pool.num_free == 0
    clock.now_s += 1
    extra = FakeWeights("extra", manager.pool.block_nbytes, owners=["other-x"])
    manager.place(extra)  # needs a block: an older soft prompt goes, never an adapter
    assert extra.tier == "device"
    assert all(a.tier == "device" for a in adapters)
    assert sum(o.tier != "device" for o in others) == 1


def test_a_device_too_small_for_eight_slots_gets_fewer_and_keeps_half_for_kv():
    clock = Clock()
    manager = _sglang(blocks=10, clock=clock)
    adapters = _placed(manager, 6, clock)
    assert manager.tiers.slots.slots == 5  # half of 10 blocks, one block per adapter
    assert sum(a.tier == "device" for a in adapters) == 5
    assert manager.request_room_blocks == 5


def test_a_request_waiting_for_a_slot_does_not_hold_up_later_loads():
    clock = Clock()
    manager = make_manager(blocks=64, host_nbytes=10**6, policy="sglang-hicache", clock=clock)
    adapters = _placed(manager, SLOTS + 1, clock)
    for adapter in adapters:
        if adapter.tier == "device":
            adapter.pins = 1  # every slot runs a request
    waiting = next(a for a in adapters if a.tier == "host")
    page = FakeWeights("page", manager.pool.block_nbytes, owners=["other"])
    manager.add(page)  # on the host
    manager.request_group(1, [waiting])
    manager.request_group(2, [page])
    manager.serve_on_demand()
    assert waiting.tier == "host" and page.tier == "device"


def test_removing_an_adapter_gives_its_slot_back():
    clock = Clock()
    manager = _sglang(clock=clock)
    adapters = _placed(manager, SLOTS + 1, clock)
    gone = next(a for a in adapters if a.tier == "device")
    manager.remove(gone)
    assert manager.tiers.slots.free_slots == 1
    assert manager.promote(next(a for a in adapters if a.tier == "host"))


def test_the_slots_are_the_stacked_buffers():
    manager = _sglang()
    free_before = manager.pool.num_free
    assert manager.reserve_stacks(10 * manager.pool.block_nbytes)
    assert manager.pool.num_free == free_before


def test_vllm_holds_at_most_max_cpu_loras_adapters_and_reads_the_others_from_their_files():
    clock = Clock()
    manager = make_manager(blocks=64, host_nbytes=0, policy="vllm", clock=clock)
    cap = manager.tiers.slots.held_cap
    adapters = _placed(manager, SLOTS + 3, clock)
    assert sum(a.tier == "device" for a in adapters) == SLOTS
    # the device slots and the host cache hold `cap` adapters together: the rest went back to their files
    assert sum(a.tier in ("device", "host") for a in adapters) == cap
    assert sum(a.tier == "disk" for a in adapters) == len(adapters) - cap
    # a request for one on disk reads it again; the least recently used slot makes way, and past the
    # cap the least recently used host copy is dropped
    clock.now_s += 1
    oldest_on_disk = min((a for a in adapters if a.tier == "disk"), key=lambda a: a.last_use_s)
    assert manager.promote(oldest_on_disk)
    assert oldest_on_disk.tier == "device"
    assert sum(a.tier in ("device", "host") for a in adapters) == cap
    # a slot's adapter makes way by dropping its copy (no device-to-host copy): once for each of the
    # three placements past the cap, then once for this load
    stats = manager.stats.snapshot()
    assert stats["evicted.adapter.device"] == len(adapters) - cap + 1
    assert stats.get("bytes_out.adapter.device_to_host", 0) == 0


def test_under_vllm_an_adapter_no_slot_can_take_waits_in_its_files_and_loads_when_a_slot_frees():
    clock = Clock()
    manager = make_manager(blocks=64, host_nbytes=0, policy="vllm", clock=clock)
    adapters = _placed(manager, SLOTS, clock)
    for adapter in adapters:
        adapter.pins = 1  # every slot runs a request
    clock.now_s += 1
    extra = FakeAdapter("extra", manager.pool.block_nbytes, owners=["agent-x"])
    manager.place(extra)
    assert extra.tier == "disk"  # the cap holds while every slot is busy
    manager.request_group(1, [extra])
    manager.serve_on_demand()
    assert extra.tier == "disk"
    adapters[3].pins = 0
    manager.serve_on_demand()
    assert extra.tier == "device" and adapters[3].tier == "disk"  # dropped, not copied to the host first
    assert sum(a.tier in ("device", "host") for a in [*adapters, extra]) == manager.tiers.slots.held_cap
    assert manager.stats.snapshot().get("bytes_out.adapter.device_to_host", 0) == 0


def test_under_vllm_a_failed_load_drops_no_host_copy_and_a_removed_adapter_leaves_the_count():
    clock = Clock()
    manager = make_manager(blocks=64, host_nbytes=0, policy="vllm", clock=clock)
    manager.tiers.slots.held_cap = SLOTS + 1  # room for one host copy beside the slots
    adapters = _placed(manager, SLOTS + 2, clock)
    on_host = [a for a in adapters if a.tier == "host"]
    on_disk = [a for a in adapters if a.tier == "disk"]
    assert len(on_host) == 1 and len(on_disk) == 1
    for adapter in adapters:
        if adapter.tier == "device":
            adapter.pins = 1
    assert not manager.promote(on_disk[0])  # every slot is busy: it fails ...
    assert on_host[0].tier == "host"        # ... and costs the host copy nothing
    manager.remove(on_host[0])
    assert on_host[0].key not in manager.tiers.slots.known and manager.tiers.slots.held_excess() == 0


@pytest.fixture(scope="module")
def adapter_folders(tmp_path_factory):
    return make_random_adapters("tiny-random", tmp_path_factory.mktemp("slots"), count=SLOTS + 2, rank=4, seed=3)


def test_an_engine_under_sglang_and_vllm_runs_at_most_eight_adapters_per_batch_and_the_same_tokens(adapter_folders):
    names = [f"lora-{i}" for i in range(len(adapter_folders))]
    prompts = [f"agent {i} walks to the market and" for i in range(len(names))]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outputs = {}
    for policy in ("sglang", "vllm", "lru"):
        llm = LLM("tiny-random", kv_cache_memory="8MiB", block_size_tokens=4, policy=policy, dtype="fp32")
        try:
            for name, folder in zip(names, adapter_folders):
                llm.add_adapter(name, str(folder))
            distinct, run = [], llm.engine.runner.run

            def recording_run(batch, run=run, distinct=distinct):
                distinct.append(len({item.seq.adapter for item in batch}))
                return run(batch)

            llm.engine.runner.run = recording_run
            outputs[policy] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, adapters=names)]
            if policy in ("sglang", "vllm"):
                assert max(distinct) == SLOTS  # ten adapters asked for at once: eight run, two wait
            else:
                assert max(distinct) == len(names)
        finally:
            llm.close()
    assert outputs["sglang"] == outputs["vllm"] == outputs["lru"]


def test_a_request_that_no_longer_fits_after_the_slot_area_grew_fails_instead_of_waiting(adapter_folders):
    page_nbytes = LLM("tiny-random", kv_cache_memory="1MiB", block_size_tokens=4, dtype="fp32").engine.pool.block_nbytes
    llm = LLM("tiny-random", kv_cache_memory=64 * page_nbytes, block_size_tokens=4, policy="sglang", dtype="fp32")
    try:
        engine = llm.engine
        prompt = list(range(1, 200))  # 50 of the 64 pages with its reply
        engine.add_request(prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), request_id="big")
        llm.add_adapter("lora-0", str(adapter_folders[0]))  # the slot area takes up to half the pool
        assert engine.memory.request_room_blocks < 50
        deltas = []
        for _ in range(100):
            deltas += engine.step()
            if not engine.has_unfinished():
                break
        assert not engine.has_unfinished()
        assert [d.finish_reason for d in deltas] == ["error"] and "device pages" in deltas[0].error
    finally:
        llm.close()


def test_a_held_cap_below_the_slot_count_is_refused_with_a_clear_error():
    from scalesim.memory.slot_pool import SlotPool

    with pytest.raises(ValueError, match="held cap"):
        SlotPool("adapter", SLOTS, held_cap=SLOTS - 1)

"""Moving an agent's KV between two engines: export, verify and import, then drop at the source."""

import random

import pytest

from scalesim import LLM, SamplingParams
from scalesim.memory.agent_kv import (NoDiskTierError, adopt_state_dir, agents_with_kv, drop_agent_kv,
                                      export_agent_kv, import_agent_kv)
from scalesim.memory.disk_store import DiskStore, StateDirInUseError
from tests.conftest import random_prompt

GREEDY = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)


def _llm(state_dir=None, **kwargs) -> LLM:
    args = {**dict(dtype="fp32", device_memory="192KiB", host_memory="64MiB", block_size_tokens=4,
                   max_num_batched_tokens=256), **kwargs}
    return LLM("tiny-random", disk_dir=str(state_dir) if state_dir else None, **args)


@pytest.fixture
def pair(tmp_path):
    source, target = _llm(tmp_path / "a"), _llm(tmp_path / "b")
    yield source, target
    source.engine.shutdown()
    target.engine.shutdown()


def _prompt(seed: int, length: int) -> list[int]:
    return random_prompt(random.Random(seed), length)


def test_an_exported_agent_is_served_from_the_imported_pages_with_the_same_output(pair):
    source, target = pair
    system, history = _prompt(7, 32), _prompt(8, 40)
    first = source.generate([system + history], GREEDY, agent_ids=["ann"])[0]
    source.generate([system + _prompt(9, 40)], GREEDY, agent_ids=["ben"])  # shares the system prompt
    files = export_agent_kv(source.engine.kv_objects, "ann")
    assert len(files) == 2, "the shared system prompt's node and ann's own, parents first"
    assert set(agents_with_kv(source.engine.kv_objects)) == {"ann", "ben"}

    result = import_agent_kv(target.engine.kv_objects, "ann", files)
    assert (result.attached, result.present, result.rejected) == (2, 0, 0) and result.nbytes > 0 and result.complete
    imported = target.engine.memory.objects_of("ann")
    assert len(imported) == 2 and all(o.tier == "disk" for o in imported), "owned by ann, so hints prefetch them"
    moved = target.generate([system + history], GREEDY, agent_ids=["ann"])[0]
    # every page but the last (a request computes at least its last token)
    assert moved.num_cached_tokens == 68 and moved.outputs[0].token_ids == first.outputs[0].token_ids
    assert target.memory_stats()["hit.kv.disk"] > 0

    disk_nbytes = target.memory_stats()["disk_used_nbytes"]
    assert import_agent_kv(target.engine.kv_objects, "ann", files).present == 2, "a second import adds nothing"
    assert target.memory_stats()["disk_used_nbytes"] == disk_nbytes
    assert drop_agent_kv(source.engine.kv_objects, "ann") == (1, 0), "ann's own node; the shared one stays"
    assert set(agents_with_kv(source.engine.kv_objects)) == {"ben"}
    again = source.generate([system + history], GREEDY, agent_ids=["ann"])[0]
    assert again.num_cached_tokens == 32, "only the system prompt is left at the source"


def test_a_node_running_past_the_shared_prompt_is_split_and_the_pages_it_holds_are_cut_off_the_file(pair):
    """The target served only dan, whose one node holds the system prompt and his history: ann's
    system-prompt file is present already, and her own node goes under the system prompt's end,
    where dan's node is split."""
    source, target = pair
    system, history = _prompt(7, 32), _prompt(8, 40)
    first = source.generate([system + history], GREEDY, agent_ids=["ann"])[0]
    source.generate([system + _prompt(9, 40)], GREEDY, agent_ids=["ben"])
    target.generate([system + _prompt(10, 40)], GREEDY, agent_ids=["dan"])
    result = import_agent_kv(target.engine.kv_objects, "ann", export_agent_kv(source.engine.kv_objects, "ann"))
    assert (result.present, result.attached, result.blocked) == (1, 1, 0) and result.complete
    moved = target.generate([system + history], GREEDY, agent_ids=["ann"])[0]
    assert moved.num_cached_tokens == 68 and moved.outputs[0].token_ids == first.outputs[0].token_ids
    again = target.generate([system + _prompt(10, 40)], GREEDY, agent_ids=["dan"])[0]
    assert again.num_cached_tokens == 68, "dan's pages were split, not lost"


def test_a_node_on_disk_in_the_way_is_split_and_both_agents_keep_their_pages_across_a_restart(tmp_path):
    source, target = _llm(tmp_path / "a"), _llm(tmp_path / "b")
    system, history, dans = _prompt(7, 32), _prompt(8, 40), _prompt(10, 40)
    try:
        first = source.generate([system + history], GREEDY, agent_ids=["ann"])[0]
        source.generate([system + _prompt(9, 40)], GREEDY, agent_ids=["ben"])
        dan = target.generate([system + dans], GREEDY, agent_ids=["dan"])[0]
        target.engine.shutdown()  # dan's one node is persisted and comes back on disk
        target = _llm(tmp_path / "b")
        assert [o.tier for o in target.engine.memory.objects_of("dan")] == ["disk"]
        result = import_agent_kv(target.engine.kv_objects, "ann", export_agent_kv(source.engine.kv_objects, "ann"))
        assert (result.present, result.attached, result.blocked) == (1, 1, 0) and result.complete
        assert sorted(o.tier for o in target.engine.memory.objects_of("dan")) == ["disk", "disk"], "two nodes now"
        target.engine.shutdown()  # the index says where each part's pages are
        target = _llm(tmp_path / "b")
        moved = target.generate([system + history], GREEDY, agent_ids=["ann"])[0]
        assert moved.num_cached_tokens == 68 and moved.outputs[0].token_ids == first.outputs[0].token_ids
        again = target.generate([system + dans], GREEDY, agent_ids=["dan"])[0]
        assert again.num_cached_tokens == 68 and again.outputs[0].token_ids == dan.outputs[0].token_ids
    finally:
        source.engine.shutdown()
        target.engine.shutdown()


def test_a_split_that_cannot_write_its_file_changes_nothing_and_the_import_says_blocked(tmp_path):
    source, target = _llm(tmp_path / "a"), _llm(tmp_path / "b")
    system, history, dans = _prompt(7, 32), _prompt(8, 40), _prompt(10, 40)
    try:
        source.generate([system + history], GREEDY, agent_ids=["ann"])
        source.generate([system + _prompt(9, 40)], GREEDY, agent_ids=["ben"])
        target.generate([system + dans], GREEDY, agent_ids=["dan"])
        target.engine.shutdown()
        target = _llm(tmp_path / "b")
        store = target.engine.memory.store
        store.budget_nbytes = store.used_nbytes  # the disk tier is full: the upper part's file cannot be written
        result = import_agent_kv(target.engine.kv_objects, "ann", export_agent_kv(source.engine.kv_objects, "ann"))
        assert (result.present, result.attached, result.blocked) == (1, 0, 1) and not result.complete
        assert [o.tier for o in target.engine.memory.objects_of("dan")] == ["disk"], "dan's node is whole"
        assert target.generate([system + dans], GREEDY, agent_ids=["dan"])[0].num_cached_tokens == 68
    finally:
        source.engine.shutdown()
        target.engine.shutdown()


def test_a_node_on_the_host_in_the_way_is_split_and_the_host_budget_still_adds_up(pair):
    source, target = pair
    system, history, dans = _prompt(7, 32), _prompt(8, 40), _prompt(10, 40)
    source.generate([system + history], GREEDY, agent_ids=["ann"])
    source.generate([system + _prompt(9, 40)], GREEDY, agent_ids=["ben"])
    target.generate([system + dans], GREEDY, agent_ids=["dan"])
    memory = target.engine.memory
    with memory.lock:
        (node,) = memory.objects_of("dan")
        memory.evictor.device_room(memory.pool.num_blocks)  # everything off the device: dan's node goes to the host
    nbytes = node.nbytes
    assert node.tier == "host" and memory.usage()["host"] == nbytes
    result = import_agent_kv(target.engine.kv_objects, "ann", export_agent_kv(source.engine.kv_objects, "ann"))
    assert result.complete and result.attached == 1
    parts = memory.objects_of("dan")
    assert [o.tier for o in parts] == ["host", "host"]
    assert memory.usage()["host"] == sum(o.nbytes for o in parts) == nbytes
    again = target.generate([system + dans], GREEDY, agent_ids=["dan"])[0]
    assert again.num_cached_tokens == 68


def test_the_folder_a_stopped_engine_left_is_taken_in_with_its_owners_and_emptied(pair, tmp_path):
    source, target = pair
    system, history = _prompt(7, 32), _prompt(8, 40)
    first = source.generate([system + history], GREEDY, agent_ids=["ann"])[0]
    source.generate([system + _prompt(9, 40)], GREEDY, agent_ids=["ben"])
    with pytest.raises(StateDirInUseError):
        adopt_state_dir(target.engine.kv_objects, tmp_path / "a")  # still running
    source.engine.shutdown()  # a scale-down: its tiers are persisted to its folder
    result = adopt_state_dir(target.engine.kv_objects, tmp_path / "a")
    assert (result.files, result.attached, result.blocked) == (3, 3, 0)
    assert set(agents_with_kv(target.engine.kv_objects)) == {"ann", "ben"}, "owned as they were"
    moved = target.generate([system + history], GREEDY, agent_ids=["ann"])[0]
    assert moved.num_cached_tokens == 68 and moved.outputs[0].token_ids == first.outputs[0].token_ids
    left = DiskStore(tmp_path / "a", 2**30, target.engine.memory.store.identity)
    assert left.entries("kv") == [], "what was taken in is gone from the folder"
    left.close()


def test_files_of_another_page_size_or_damaged_are_rejected_and_nothing_is_attached(tmp_path):
    source, other = _llm(tmp_path / "a"), _llm(tmp_path / "b", block_size_tokens=8)
    try:
        source.generate([_prompt(1, 48)], GREEDY, agent_ids=["cal"])
        files = export_agent_kv(source.engine.kv_objects, "cal")
        damaged = [f[:100] + bytes([f[100] ^ 1]) + f[101:] for f in files]
        for sent in (files, damaged):
            result = import_agent_kv(other.engine.kv_objects, "cal", sent)
            assert result.rejected == len(files) and result.attached == 0 and not result.complete
        assert other.memory_stats()["disk_used_nbytes"] == 0
    finally:
        source.engine.shutdown()
        other.engine.shutdown()


def test_an_engine_without_a_disk_tier_says_moves_need_one():
    llm = _llm()
    try:
        with pytest.raises(NoDiskTierError, match="--disk-dir"):
            export_agent_kv(llm.engine.kv_objects, "dee")
    finally:
        llm.engine.shutdown()

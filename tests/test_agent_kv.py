"""Moving an agent's KV between two engines: export, verify and import, then drop at the source."""

import random

import pytest

from scalesim import LLM, SamplingParams
from scalesim.memory.agent_kv import (NoDiskTierError, agents_with_kv, drop_agent_kv, export_agent_kv,
                                      import_agent_kv)
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


def test_a_node_off_the_device_in_the_way_blocks_the_import_and_says_it_is_incomplete(tmp_path):
    source, target = _llm(tmp_path / "a"), _llm(tmp_path / "b")
    system, history = _prompt(7, 32), _prompt(8, 40)
    try:
        source.generate([system + history], GREEDY, agent_ids=["ann"])
        source.generate([system + _prompt(9, 40)], GREEDY, agent_ids=["ben"])
        target.generate([system + _prompt(10, 40)], GREEDY, agent_ids=["dan"])
        target.engine.shutdown()  # dan's one node is persisted and comes back on disk, which cannot be split
        target = _llm(tmp_path / "b")
        stored = {key for key, _, _ in target.engine.memory.store.entries("kv")}
        result = import_agent_kv(target.engine.kv_objects, "ann", export_agent_kv(source.engine.kv_objects, "ann"))
        assert (result.present, result.attached, result.blocked) == (1, 0, 1) and not result.complete
        assert {key for key, _, _ in target.engine.memory.store.entries("kv")} == stored, "nothing stored"
    finally:
        source.engine.shutdown()
        target.engine.shutdown()


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

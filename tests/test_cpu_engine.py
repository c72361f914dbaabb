"""The CPU engine's own pieces: oneDNN linears, paged attention, the thread governor, the peer
bench's arithmetic."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from scalesim.bench.peer_bench import PeerCase, arm_name
from scalesim.bench.peer_bench import markdown_table as peer_table
from scalesim.engine.cpu_runtime import configure_cpu_allocator
from scalesim.engine.cpu_threads import ThreadGovernor
from scalesim.layers.attention import AttentionMetadata, PrefillChunk, paged_attention
from scalesim.layers.linear import linear
from scalesim.layers.paged_decode import available as paged_decode_available, paged_decode
from scalesim.layers.paged_prefill import available as paged_prefill_available, paged_prefill
from scalesim.layers.paged_prefill import tiles as paged_prefill_tiles


@pytest.mark.parametrize("rows", [0, 1, 7, 300])
def test_onednn_linear_equals_f_linear(rows):
    x, w, b = torch.randn(rows, 96), torch.randn(160, 96), torch.randn(160)
    assert torch.allclose(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    got = linear(x.bfloat16(), w.bfloat16()).float()
    assert torch.allclose(got, F.linear(x.bfloat16().float(), w.bfloat16().float()), atol=0.1, rtol=0.02)


def test_the_allocator_setting_takes_effect_on_glibc():
    assert configure_cpu_allocator()


def _reference(q, keys, values, scale):
    """Dense causal attention of queries at the last len(q) positions of a context."""
    heads, kv_heads = q.shape[1], keys.shape[1]
    keys, values = keys.repeat_interleave(heads // kv_heads, 1), values.repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("qhd,chd->hqc", q, keys) * scale
    offset = keys.shape[0] - q.shape[0]
    allowed = torch.arange(keys.shape[0]).unsqueeze(0) <= torch.arange(q.shape[0]).unsqueeze(1) + offset
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.einsum("hqc,chd->qhd", scores.softmax(-1), values).reshape(q.shape[0], -1)


@pytest.mark.parametrize("decode_path, dtype", [("in_place", torch.float32), ("gather", torch.float32),
                                               ("in_place", torch.bfloat16)])
def test_paged_attention_over_a_mixed_step_equals_dense_attention(decode_path, dtype):
    """One step holding a decode token, a fresh prompt and a chunk behind cached tokens, with
    their pages scattered over the cache, gives each sequence exactly its own attention, with
    decode attention by the in-place kernel or by the gather path, over a float32 cache or a
    bfloat16 one (bfloat16 queries, keys and values; compared at bfloat16's precision)."""
    if decode_path == "in_place" and not paged_decode_available():
        pytest.skip("the paged decode kernel cannot be built on this machine")
    rng, torch_gen = random.Random(0), torch.Generator().manual_seed(0)
    heads, kv_heads, dim, block = 6, 2, 16, 4
    slots = 64 * block
    k_cache, v_cache = torch.zeros(slots, kv_heads, dim, dtype=dtype), torch.zeros(slots, kv_heads, dim, dtype=dtype)
    free = list(range(64))
    rng.shuffle(free)
    sequences = [(9, 1), (0, 7), (5, 6)]  # (cached tokens, new tokens)
    contexts, slot_rows, rows, prefills, decode = [], [], 0, [], None
    for cached, new in sequences:
        table = [free.pop() for _ in range(-(-(cached + new) // block))]
        context = [table[p // block] * block + p % block for p in range(cached + new)]
        keys, values = (torch.randn(cached + new, kv_heads, dim, generator=torch_gen).to(dtype).float()
                        for _ in range(2))
        k_cache[context[:cached]], v_cache[context[:cached]] = keys[:cached].to(dtype), values[:cached].to(dtype)
        contexts.append((keys, values))
        slot_rows += context[cached:]
        if new == 1:
            decode = (rows, context, table)
        elif cached == 0:
            prefills.append(PrefillChunk(rows, rows + new))
        else:
            prefills.append(PrefillChunk(rows, rows + new, torch.tensor(context),
                                         torch.ones(new, cached + new, dtype=torch.bool).tril(cached)))
        rows += new
    meta = AttentionMetadata(slot_mapping=torch.tensor(slot_rows), num_tokens=rows, prefills=prefills,
                             decode_rows=torch.tensor([decode[0]]))
    if decode_path == "in_place":
        meta.decode_block_tables, meta.decode_lengths = torch.tensor([decode[2]]), torch.tensor([len(decode[1])])
        meta.block_size = block
    else:
        meta.decode_slots = torch.tensor([decode[1]])
        meta.decode_mask = torch.ones(1, 1, 1, len(decode[1]), dtype=torch.bool)
    q = torch.randn(rows, heads, dim, generator=torch_gen).to(dtype).float()
    k = torch.cat([keys[cached:] for (keys, _), (cached, _) in zip(contexts, sequences)])
    v = torch.cat([values[cached:] for (_, values), (cached, _) in zip(contexts, sequences)])
    out = paged_attention(q.to(dtype), k.to(dtype), v.to(dtype), k_cache, v_cache, meta, scale=dim ** -0.5)
    assert out.dtype == dtype
    out, atol = out.float(), 1e-5 if dtype == torch.float32 else 3e-2
    start = 0
    for (keys, values), (cached, new) in zip(contexts, sequences):
        want = _reference(q[start:start + new], keys, values, dim ** -0.5)
        assert torch.allclose(out[start:start + new], want, atol=atol), (cached, new)
        start += new


@pytest.mark.parametrize("heads, kv_heads, dim", [(9, 3, 64), (4, 4, 128), (6, 2, 40)])
def test_the_paged_decode_kernel_equals_gathered_sdpa(heads, kv_heads, dim):
    """Decode sequences of unequal lengths (1 token up to a full table) with pages scattered
    over the cache: the kernel reading the cache in place gives what SDPA over gathered
    contexts gives, for the head sizes it specialises (64, 128) and any other (40)."""
    if not paged_decode_available():
        pytest.skip("the paged decode kernel cannot be built on this machine")
    gen, block, blocks = torch.Generator().manual_seed(1), 16, 40  # up to 640 tokens: 3 ranges of 256
    k_cache = torch.randn(256 * block, kv_heads, dim, generator=gen)
    v_cache = torch.randn(256 * block, kv_heads, dim, generator=gen)
    tables = torch.randperm(256, generator=gen)[:5 * blocks].view(5, blocks)
    lengths = torch.tensor([1, 17, 257, 513, blocks * block])
    q = 3 * torch.randn(5, heads, dim, generator=gen)  # peaked softmaxes: scores spread over about +-25
    got = paged_decode(q, k_cache, v_cache, tables, lengths, block, dim ** -0.5)
    for b in range(5):
        slots = (tables[b].view(-1, 1) * block + torch.arange(block)).view(-1)[:lengths[b]]
        want = _reference(q[b:b + 1], k_cache[slots], v_cache[slots], dim ** -0.5)
        assert torch.allclose(got[b].reshape(1, -1), want, atol=1e-5), b
        # a sequence's result does not depend on what it is batched with, nor on the thread count
        alone = paged_decode(q[b:b + 1], k_cache, v_cache, tables[b:b + 1], lengths[b:b + 1], block, dim ** -0.5)
        assert torch.equal(alone[0], got[b]), b
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(paged_decode(q, k_cache, v_cache, tables, lengths, block, dim ** -0.5), got)
    finally:
        torch.set_num_threads(threads)
    assert paged_decode(q[:0], k_cache, v_cache, tables[:0], lengths[:0], block, 1.0).shape == (0, heads, dim)


@pytest.mark.parametrize("dim, block, dtype, heads, kv_heads, use_tiles", [
    (64, 16, torch.float32, 9, 3, False), (64, 16, torch.bfloat16, 9, 3, False), (64, 16, torch.bfloat16, 9, 3, True),
    (128, 4, torch.float32, 8, 1, False), (128, 4, torch.bfloat16, 8, 1, True), (64, 32, torch.bfloat16, 10, 2, False),
    (64, 32, torch.bfloat16, 10, 2, True), (32, 8, torch.float32, 8, 8, False), (32, 8, torch.bfloat16, 8, 8, True),
    (96, 16, torch.float32, 10, 2, False), (96, 16, torch.bfloat16, 10, 2, True)])
def test_the_paged_prefill_kernel_equals_dense_causal_attention(dim, block, dtype, heads, kv_heads, use_tiles):
    """Chunks fresh and behind cached tokens, of lengths around the kernel's tiles (1, 15, 16, 17,
    a 300-token one behind 100 cached), pages scattered: each new token attends causally to its
    sequence's cached context exactly; a chunk's result is the same alone, batched, and at one
    thread. Group sizes 3, 8 and 5 (blocks of 4 heads and their remainders), 1 (no sharing).
    The AMX tile path (bfloat16 caches) rounds queries and weights to bfloat16 for its products:
    the error of weights rounded to 8 bits, about 3e-3 on these values, within 1e-2."""
    if not paged_prefill_available(dim):
        pytest.skip("the paged prefill kernel serves AVX-512 CPUs only")
    if use_tiles and not paged_prefill_tiles(dim):
        pytest.skip("the tile path needs AMX-BF16")
    gen = torch.Generator().manual_seed(3)
    chunks = [(0, 37), (5, 16), (16, 17), (100, 300), (0, 1), (40, 15), (0, 64)]  # (cached, new)
    blocks_needed = [-(-(c + n) // block) for c, n in chunks]
    order = torch.randperm(sum(blocks_needed) + 5, generator=gen)
    k_cache = torch.randn(len(order) * block, kv_heads, dim, generator=gen).to(dtype)
    v_cache = torch.randn(len(order) * block, kv_heads, dim, generator=gen).to(dtype)
    widest, used, tables = max(blocks_needed), 0, []
    for count in blocks_needed:
        tables.append(order[used:used + count].tolist() + [0] * (widest - count))
        used += count
    tables = torch.tensor(tables)
    lengths = torch.tensor([c + n for c, n in chunks])
    counts = torch.tensor([n for _, n in chunks])
    starts = torch.cumsum(torch.tensor([0] + [n for _, n in chunks[:-1]]), 0)
    q = 3 * torch.randn(int(counts.sum()), heads, dim, generator=gen)
    if dtype == torch.bfloat16:
        q = q.bfloat16().float()  # a bfloat16 model's queries: the tile path's rounding of them is exact
    scale = dim ** -0.5

    def prefill(q, tables, lengths, starts, counts, out):
        paged_prefill(q, k_cache, v_cache, tables, lengths, starts, counts, block, scale, out, use_tiles=use_tiles)

    got = torch.full_like(q, float("nan"))
    prefill(q, tables, lengths, starts, counts, got)
    for i, (cached, new) in enumerate(chunks):
        slots = (tables[i].view(-1, 1) * block + torch.arange(block)).view(-1)[:cached + new]
        rows = slice(int(starts[i]), int(starts[i]) + new)
        want = _reference(q[rows], k_cache[slots].float(), v_cache[slots].float(), scale)
        assert torch.allclose(got[rows].reshape(new, -1), want, atol=1e-2 if use_tiles else 5e-5), (cached, new)
        alone = torch.zeros(new, heads, dim)
        prefill(q[rows].contiguous(), tables[i:i + 1], lengths[i:i + 1], torch.tensor([0]), counts[i:i + 1], alone)
        assert torch.equal(alone, got[rows]), (cached, new)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = torch.empty_like(q)
        prefill(q, tables, lengths, starts, counts, again)
        assert torch.equal(again, got)
    finally:
        torch.set_num_threads(threads)
    # a bfloat16 model's queries in and outputs out, as they are: its float32 result, rounded
    rounded_in = q.bfloat16()
    rounded = torch.empty_like(rounded_in)
    prefill(rounded_in, tables, lengths, starts, counts, rounded)
    widened = torch.empty_like(q)
    prefill(rounded_in.float(), tables, lengths, starts, counts, widened)
    assert torch.equal(rounded, widened.bfloat16())
    with pytest.raises(RuntimeError, match="chunk out of range"):
        prefill(q, tables, lengths, starts, counts + 1000, got)


@pytest.mark.parametrize("position", [0, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", ["keys", "values"])
def test_a_nan_in_the_cache_makes_the_prefill_kernels_output_nan_in_its_own_sequence_only(position, dtype, cache):
    """A NaN in one sequence's cached keys or values reaches the outputs of the queries that see
    it (so the sampler's non-finite check fails that sequence) wherever it sits, and neither the
    earlier tokens of its sequence (whose pages another request may share) nor another sequence
    (bfloat16: the tile path where there is AMX, which multiplies whole blocks of values)."""
    if not paged_prefill_available(64):
        pytest.skip("the paged prefill kernel serves AVX-512 CPUs only")
    gen, block = torch.Generator().manual_seed(4), 16
    k_cache, v_cache = (torch.randn(8 * block, 3, 64, generator=gen).to(dtype) for _ in range(2))
    tables = torch.tensor([[0, 1], [2, 3]])
    (k_cache if cache == "keys" else v_cache)[position, 1, 5] = float("nan")  # sequence 0's token `position`, kv head 1
    q = torch.randn(40, 9, 64, generator=gen)
    out = torch.empty_like(q)
    paged_prefill(q, k_cache, v_cache, tables, torch.tensor([20, 20]), torch.tensor([0, 20]),
                  torch.tensor([20, 20]), block, 0.125, out)
    sees = out[position:20, 3:6]  # the queries at or after the NaN, in the heads of kv head 1
    assert torch.isnan(sees).any(dim=-1).all() and torch.isfinite(out[:position]).all()
    assert torch.isfinite(out[position:20, :3]).all() and torch.isfinite(out[20:]).all()


def test_the_paged_decode_kernel_reads_a_bfloat16_cache_as_its_float32_values():
    if not paged_decode_available():
        pytest.skip("the paged decode kernel cannot be built on this machine")
    gen, block = torch.Generator().manual_seed(2), 16
    k_cache, v_cache = (torch.randn(32 * block, 3, 64, generator=gen).bfloat16() for _ in range(2))
    tables, lengths = torch.randperm(32, generator=gen)[:12].view(3, 4), torch.tensor([5, 33, 64])
    q = torch.randn(3, 9, 64, generator=gen)
    got = paged_decode(q, k_cache, v_cache, tables, lengths, block, 0.125)
    want = paged_decode(q, k_cache.float(), v_cache.float(), tables, lengths, block, 0.125)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)


def test_the_paged_decode_kernel_refuses_a_length_beyond_its_table():
    if not paged_decode_available():
        pytest.skip("the paged decode kernel cannot be built on this machine")
    cache = torch.zeros(64, 1, 8)
    with pytest.raises(RuntimeError, match="context length out of range"):
        paged_decode(torch.zeros(1, 1, 8), cache, cache, torch.tensor([[0, 1]]), torch.tensor([40]), 16, 1.0)


class _Ticks:
    def __init__(self) -> None:
        self.now_s, self.machine, self.own = 0.0, 0, 0

    def spend(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.now_s += seconds
        self.own += int(own_cores * seconds * 100)
        self.machine += int((own_cores + other_cores) * seconds * 100)


def test_the_thread_count_follows_the_cores_other_processes_leave_free(monkeypatch):
    ticks, calls = _Ticks(), []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    governor = ThreadGovernor(max_threads=2, cores=2, interval_s=1.0, machine_ticks=lambda: ticks.machine,
                              own_ticks=lambda: ticks.own, clock=lambda: ticks.now_s)
    ticks.spend(1.0, own_cores=2.0, other_cores=0.05)
    assert governor.maybe_adjust() == 2 and calls == []
    ticks.spend(1.0, own_cores=1.0, other_cores=1.0)  # a competitor holds a core
    assert governor.maybe_adjust() == 1 and calls == [1]
    ticks.spend(0.5, own_cores=1.0, other_cores=0.0)
    assert governor.maybe_adjust() == 1, "measured at most once per interval"
    ticks.spend(1.0, own_cores=1.0, other_cores=0.0)  # it left
    assert governor.maybe_adjust() == 2 and calls == [1, 2]
    ticks.spend(60.0, own_cores=0.0, other_cores=2.0)  # idle (or stopped) while others ran
    assert governor.maybe_adjust() == 2, "a stale window starts a new one, it decides nothing"
    ticks.spend(1.0, own_cores=2.0, other_cores=0.0)
    assert governor.maybe_adjust() == 2
    assert governor.threads_for(0.6) == 1 and governor.threads_for(0.4) == 2


def test_peer_ratios_point_the_same_way_for_rates_and_times():
    rate, time_case = PeerCase("prefill", "tokens/s"), PeerCase("feed", "s")
    rate.values = {"scalesim": [900.0, 1000.0, 1100.0], "vllm": [500.0, 450.0, 550.0]}
    time_case.values = {"scalesim": [30.0, 33.0], "vllm": [60.0, 66.0]}
    assert rate.summary()["scalesim_speedup"] == pytest.approx(2.0)
    assert time_case.summary()["scalesim_speedup"] == pytest.approx(2.0)
    assert rate.summary()["spread"]["scalesim"] == pytest.approx(1100 / 900 - 1)


def test_peer_arms_each_get_their_ratio_and_their_own_table_rows():
    arms = ("scalesim", "scalesim-fp16", "vllm")
    feed = PeerCase("feed", "s", arms)
    feed.values = {"scalesim": [30.0, 32.0], "scalesim-fp16": [20.0, 22.0], "vllm": [40.0, 44.0]}
    summary = feed.summary()
    assert summary["speedups"] == pytest.approx({"scalesim": 42 / 31, "scalesim-fp16": 2.0})
    assert summary["scalesim_speedup"] == pytest.approx(42 / 31)  # the first arm's, as files before arms had
    assert PeerCase("prefill", "tokens/s", arms).values == {a: [] for a in arms}
    result = {"dtypes": {"fp32": {"scalesim_dtype": "fp32", "scalesim_arms": {"scalesim": "none", "scalesim-fp16": "fp16"},
                                  "cases": {"feed": summary}}}}
    rows = peer_table(result).splitlines()[2:]
    assert len(rows) == 2
    assert rows[0].startswith("| feed trace, ample KV (makespan s) | fp32 | 31 (30, 32) | 42 (40, 44) | **1.35x**")
    assert rows[1].startswith("| feed trace, ample KV (makespan s) | ScaleSim fp32 + fp16 weights, vLLM fp32 | 21 (20, 22) "
                              "| 42 (40, 44) | **2.00x**")


def test_peer_speculation_arms_are_named_and_compared_with_each_vllm_arm():
    assert arm_name("none") == "scalesim" and arm_name("none", 0) == "scalesim-nospec"
    assert arm_name("fp16", 4) == "scalesim-fp16-spec4"
    arms = ("scalesim", "scalesim-nospec", "vllm", "vllm-ngram")
    feed = PeerCase("feed", "s", arms)
    feed.values = {"scalesim": [8.0], "scalesim-nospec": [10.0], "vllm": [11.0], "vllm-ngram": [13.0]}
    summary = feed.summary()
    assert summary["speedups"] == pytest.approx({"scalesim": 11 / 8, "scalesim-nospec": 1.1})
    assert summary["speedups_over"]["vllm-ngram"] == pytest.approx({"scalesim": 13 / 8, "scalesim-nospec": 1.3})
    entry = {"scalesim_dtype": "bf16", "scalesim_arms": {"scalesim": "none", "scalesim-nospec": "none"},
             "scalesim_speculative_tokens": {"scalesim": None, "scalesim-nospec": 0}, "default_speculative_tokens": 4,
             "vllm_arms": {"vllm": None, "vllm-ngram": {"method": "ngram"}}, "cases": {"feed": summary}}
    rows = peer_table({"dtypes": {"bf16": entry}}).splitlines()[2:]
    assert [r.split(" | ")[1] for r in rows] == [
        "ScaleSim bf16 + prompt lookup (4), vLLM bf16", "ScaleSim bf16 + prompt lookup (4), vLLM bf16 + ngram",
        "ScaleSim bf16 (no speculation), vLLM bf16", "ScaleSim bf16 (no speculation), vLLM bf16 + ngram"]
    assert [r.split(" | ")[4] for r in rows] == ["**1.38x**", "**1.62x**", "**1.10x**", "**1.30x**"]

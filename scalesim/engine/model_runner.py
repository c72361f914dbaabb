"""Run one scheduled step: build the flattened inputs and index tensors, run the model, sample."""

import logging
from dataclasses import dataclass

import torch

from scalesim.engine.block_pool import BlockPool
from scalesim.engine.cpu_threads import ThreadGovernor
from scalesim.device_tensors import device_tensor, to_device
from scalesim.engine.grammar import consume
from scalesim.engine.logits_processors import needs_processing, process_logits
from scalesim.engine.sampler import sample, top_logprobs
from scalesim.engine.scheduler import ScheduledSequence
from scalesim.engine.sequence import Sequence
from scalesim.layers import flex_paged
from scalesim.layers.attention import AttentionMetadata, PrefillChunk
from scalesim.layers.lora import LoRABatch, LoRAStackCache
from scalesim.layers.paged_decode import available as paged_decode_available
from scalesim.layers.paged_prefill import available as paged_prefill_available
from scalesim.models.llama import LlamaForCausalLM

logger = logging.getLogger(__name__)

NON_FINITE_LOGITS = ("the model produced no usable logits for this sequence (NaN or infinite values, or every "
                     "token masked): its weights or adapter may be broken")


@dataclass
class SampledToken:
    """One sequence's new tokens: one, or with a draft the drafted tokens the model agreed with
    plus its own next token; `logprobs` one per token where asked (else empty); `error` (tokens
    meaningless) when they could not be sampled."""

    seq: Sequence
    token_ids: list[int]
    logprobs: list[dict]
    error: str | None = None


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: BlockPool, device: str, attention: str = "auto") -> None:
        """`attention`: "flex" runs every step's attention as one flex_attention call per layer
        (layers/flex_paged.py); "auto" and "gather" keep the paths below (on CUDA a gather of each
        decode context, until a GPU run measures flex against it)."""
        self.model = model
        self.pool = pool
        self.device = torch.device(device)
        self.flex = attention == "flex"
        if self.flex and self.device.type != "cpu" and not flex_paged.available(self.device, pool.block_size):
            raise ValueError(f"flex attention on {self.device.type} needs pages of a multiple of 16 tokens, "
                             f"got {pool.block_size}")
        self.lora_stacks = LoRAStackCache()
        self.threads = ThreadGovernor() if self.device.type == "cpu" else None
        # decode attention reads the paged cache in place where the CPU kernel serves this cache
        self.decode_in_place = (self.device.type == "cpu" and pool.kv_cache.dtype in (torch.float32, torch.bfloat16)
                                and paged_decode_available())
        # and so does prefill attention, where the kernel serves this head size
        self.prefill_in_place = self.decode_in_place and paged_prefill_available(model.config.head_dim)

    def _metadata(self, batch: list[ScheduledSequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        block_size = self.pool.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        flex_rows: list[flex_paged.SequenceRows] = []  # with flex attention, all it needs
        decode_rows: list[int] = []
        decode_contexts: list[list[int]] = []  # block tables
        decode_lengths: list[int] = []
        prefills: list[PrefillChunk] = []
        prefill_tables: list[list[int]] = []
        prefill_lengths: list[int] = []
        for s in batch:
            start, count, table = s.seq.num_computed_tokens, s.num_new_tokens, s.seq.block_table
            row = len(input_ids)
            input_ids.extend(s.seq.token_ids[start:start + s.num_certain_tokens] + s.draft)
            positions.extend(range(start, start + count))
            slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, start + count))
            if self.flex:
                flex_rows.append(flex_paged.SequenceRows(row, count, start, table))
            elif count == 1:
                decode_rows.append(row)
                decode_contexts.append(table[:-(-(start + 1) // block_size)])
                decode_lengths.append(start + 1)
            elif self.prefill_in_place:
                prefills.append(PrefillChunk(row, row + count))
                prefill_tables.append(table[:-(-(start + count) // block_size)])
                prefill_lengths.append(start + count)
            elif start == 0:
                prefills.append(PrefillChunk(row, row + count))
            else:
                mask = torch.ones(count, start + count, dtype=torch.bool).tril(start)
                context = _context_slots(torch.tensor([table]), start + count, block_size)[0]
                prefills.append(PrefillChunk(row, row + count, self._to(context), self._to(mask)))
        meta = AttentionMetadata(slot_mapping=self._to(torch.tensor(slots)), num_tokens=len(input_ids),
                                 prefills=prefills)
        if self.flex:
            meta.flex = flex_paged.plan(flex_rows, len(input_ids), block_size, self.pool.kv_cache.shape[2], self.device)
        if prefill_tables:
            blocks = max(len(t) for t in prefill_tables)
            meta.prefill_block_tables = torch.tensor([t + [0] * (blocks - len(t)) for t in prefill_tables])
            meta.prefill_lengths = torch.tensor(prefill_lengths)
            meta.prefill_starts = torch.tensor([c.start for c in prefills])
            meta.prefill_counts = torch.tensor([c.end - c.start for c in prefills])
            meta.block_size = block_size
        if decode_contexts:
            blocks, longest = max(len(c) for c in decode_contexts), max(decode_lengths)
            tables = torch.tensor([c + [0] * (blocks - len(c)) for c in decode_contexts])
            lengths = torch.tensor(decode_lengths)
            if self.decode_in_place:
                meta.decode_block_tables, meta.decode_lengths, meta.block_size = tables, lengths, block_size
            else:
                meta.decode_slots = self._to(_context_slots(tables, longest, block_size))
                meta.decode_mask = self._to((torch.arange(longest).unsqueeze(0) < lengths.unsqueeze(1)).view(-1, 1, 1, longest))
            meta.decode_rows = self._to(torch.tensor(decode_rows))
        return self._to(torch.tensor(input_ids)), self._to(torch.tensor(positions)), meta

    def _to(self, tensor: torch.Tensor) -> torch.Tensor:
        return to_device(tensor, self.device)

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSequence]) -> list[SampledToken]:
        """Compute the batch's new tokens, one forward per model (base or private) in it; return
        one result per sequence that samples (its token, or its kept drafted tokens and the one
        after). Refuses weights that are not on the device."""
        if self.threads is not None:
            self.threads.maybe_adjust()
        groups: dict[int, list[ScheduledSequence]] = {}
        for item in batch:
            if not item.seq.weights_on_device:
                raise RuntimeError(f"refusing to run {item.seq.request_id}: its weights are not on the device")
            groups.setdefault(id(item.seq.private_model), []).append(item)
        sampled: list[SampledToken] = []
        for group in groups.values():
            private = group[0].seq.private_model
            sampled.extend(self._run_isolated(self.model if private is None else private.model, group))
        return sampled

    def _run_isolated(self, model: LlamaForCausalLM, group: list[ScheduledSequence]) -> list[SampledToken]:
        """The group's tokens. If its step raises, each sequence is rerun alone from the state it
        had (its KV slots are rewritten; its progress is recorded only by the engine, afterwards),
        so only a sequence that raises alone fails, with the error as its `error`."""
        saved = [(len(item.seq.prompt_logits), item.seq.generator.get_state() if item.seq.generator else None)
                 for item in group]
        try:
            return self._run_group(model, group)
        except Exception as exc:
            if len(group) == 1:
                return [_failed(group[0].seq, exc)]
            logger.warning("a step of %d sequences failed (%s); running them one by one", len(group), exc)
        sampled = []
        for item, (logits_rows, generator_state) in zip(group, saved):
            del item.seq.prompt_logits[logits_rows:]
            if generator_state is not None:
                item.seq.generator.set_state(generator_state)
            try:
                sampled.extend(self._run_group(model, [item]))
            except Exception as exc:
                sampled.append(_failed(item.seq, exc))
        return sampled

    def _run_group(self, model: LlamaForCausalLM, batch: list[ScheduledSequence]) -> list[SampledToken]:
        input_ids, positions, meta = self._metadata(batch)
        token_adapters = [item.seq.adapter for item in batch for _ in range(item.num_new_tokens)]
        lora = LoRABatch(token_adapters, self.device, self.lora_stacks) if any(token_adapters) else None
        hidden = model(input_ids, positions, self.pool.kv_cache, meta, lora)
        ends = torch.tensor([s.num_new_tokens for s in batch]).cumsum(0)
        for s, end in zip(batch, ends.tolist()):
            if s.seq.want_prompt_logits and s.seq.num_computed_tokens < len(s.seq.prompt_token_ids):
                s.seq.prompt_logits.append(model.compute_logits(hidden[end - s.num_new_tokens:end]).cpu())
        # the rows that sample: a sequence's last one, or with a draft also the drafted tokens'
        sampling = [(s, end - 1 - len(s.draft) + i) for s, end in zip(batch, ends.tolist()) if s.samples
                    for i in range(len(s.draft) + 1)]
        if not sampling:
            return []
        rows = device_tensor([row for _, row in sampling], self.device)
        logits = model.compute_logits(hidden.index_select(0, rows))
        seqs = [s.seq for s, _ in sampling]
        if any(needs_processing(q) for q in seqs):
            logits = process_logits(logits, seqs)
        tokens, failed = sample(logits, [q.params for q in seqs], [q.generator for q in seqs])
        want = max((q.params.logprobs for q in seqs if q.params.logprobs is not None), default=None)
        infos = top_logprobs(logits, tokens, want) if want is not None else [None] * len(seqs)
        token_ids, failed_rows = torch.stack([tokens, failed.to(tokens.dtype)]).tolist()  # the step's one wait
        results, row = [], 0
        for s in (s for s in batch if s.samples):
            q, count = s.seq, len(s.draft) + 1
            kept = _kept(s.draft, token_ids[row:row + count])
            logprobs = infos[row:row + len(kept)] if q.params.logprobs is not None else []
            broken = any(failed_rows[row:row + len(kept)])
            row += count
            if broken:
                logger.warning("failing %s: %s", q.request_id, NON_FINITE_LOGITS)
                results.append(SampledToken(q, kept, [], NON_FINITE_LOGITS))
                continue
            if q.grammar is not None:  # last, and per sequence: nothing of the step is redone after it
                try:
                    consume(q.grammar, kept[0])  # (a sequence with a grammar has no draft)
                except Exception as exc:
                    results.append(_failed(q, exc))
                    continue
            results.append(SampledToken(q, kept, logprobs))
        return results


def _kept(draft: list[int], chosen: list[int]) -> list[int]:
    """The tokens a step keeps of a sequence with `draft`, given the model's choice at each of
    its len(draft) + 1 positions: the drafted tokens it chose too, up to the first it did not,
    then its own choice there (or after the whole draft)."""
    kept = []
    for guess, token in zip(draft + [None], chosen):
        kept.append(int(token))
        if token != guess:
            break
    return kept


def _failed(seq: Sequence, exc: Exception) -> SampledToken:
    logger.error("sequence %s failed its step", seq.request_id, exc_info=exc)
    return SampledToken(seq, [], [], f"engine step failed: {type(exc).__name__}: {exc}")


def _context_slots(block_tables: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Cache slots [B, length] of the first `length` tokens of each sequence, from block tables
    [B, blocks] (a table shorter than `length` needs is padded with block 0)."""
    positions = torch.arange(length)
    return block_tables[:, positions // block_size] * block_size + positions % block_size

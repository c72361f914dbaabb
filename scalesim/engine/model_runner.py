"""Run one scheduled step: build the flattened inputs and index tensors, run the model, sample."""

from dataclasses import dataclass

import torch

from scalesim.engine.block_pool import BlockPool
from scalesim.engine.logits_processors import TokenTexts, advance_constraints, process_logits
from scalesim.engine.sampler import sample, top_logprobs
from scalesim.engine.scheduler import ScheduledSequence
from scalesim.engine.sequence import Sequence
from scalesim.layers.attention import AttentionMetadata
from scalesim.layers.lora import LoRABatch, LoRAStackCache
from scalesim.models.llama import LlamaForCausalLM


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprobs: dict | None


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: BlockPool, device: str, token_texts: TokenTexts) -> None:
        self.model = model
        self.token_texts = token_texts
        self.pool = pool
        self.device = torch.device(device)
        self.lora_stacks = LoRAStackCache()

    def _metadata(self, batch: list[ScheduledSequence]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        block_size = self.pool.block_size
        starts = [s.seq.num_computed_tokens for s in batch]
        counts = [s.num_new_tokens for s in batch]
        input_ids: list[int] = []
        for s, start, count in zip(batch, starts, counts):
            input_ids.extend(s.seq.token_ids[start:start + count])
        max_q, max_ctx = max(counts), max(a + b for a, b in zip(starts, counts))
        max_blocks = -(-max_ctx // block_size)
        tables = torch.tensor([s.seq.block_table[:max_blocks] + [0] * (max_blocks - len(s.seq.block_table[:max_blocks]))
                               for s in batch])
        start_t, count_t = torch.tensor(starts), torch.tensor(counts)
        offsets = torch.arange(max_q)
        valid = offsets.unsqueeze(0) < count_t.unsqueeze(1)                     # [B, Q]
        query_pos = start_t.unsqueeze(1) + torch.minimum(offsets.unsqueeze(0), count_t.unsqueeze(1) - 1)
        ctx = torch.arange(max_ctx)
        context_slots = tables[:, ctx // block_size] * block_size + ctx % block_size   # [B, C]
        mask = (ctx.view(1, 1, -1) <= query_pos.unsqueeze(2)).unsqueeze(1)     # [B, 1, Q, C]
        rows = torch.arange(len(batch)).unsqueeze(1) * max_q + offsets.unsqueeze(0)
        query_index = rows[valid]
        positions = query_pos[valid]
        slot_mapping = context_slots.gather(1, query_pos)[valid]
        to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        meta = AttentionMetadata(slot_mapping=to(slot_mapping), context_slots=to(context_slots), mask=to(mask),
                                 query_index=to(query_index), max_query_len=max_q)
        return to(torch.tensor(input_ids)), to(positions), meta

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSequence]) -> list[SampledToken]:
        """Compute the batch's new tokens, one forward per model (base or private) in it; return
        one sampled token per sequence that samples. Refuses weights that are not on the device."""
        groups: dict[int, list[ScheduledSequence]] = {}
        for item in batch:
            if not item.seq.weights_on_device:
                raise RuntimeError(f"refusing to run {item.seq.request_id}: its weights are not on the device")
            groups.setdefault(id(item.seq.private_model), []).append(item)
        sampled: list[SampledToken] = []
        for group in groups.values():
            private = group[0].seq.private_model
            sampled.extend(self._run_group(self.model if private is None else private.model, group))
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
        sampling = [(s, end - 1) for s, end in zip(batch, ends.tolist()) if s.samples]
        if not sampling:
            return []
        rows = torch.tensor([row for _, row in sampling], device=self.device)
        logits = model.compute_logits(hidden.index_select(0, rows))
        seqs = [s.seq for s, _ in sampling]
        if any(q.params.logit_bias or q.json is not None for q in seqs):
            logits = process_logits(logits, seqs, self.token_texts)
        tokens = sample(logits, [q.params for q in seqs], [q.generator for q in seqs])
        if any(q.json is not None for q in seqs):
            advance_constraints(seqs, tokens.tolist(), self.token_texts)
        want = max((q.params.logprobs for q in seqs if q.params.logprobs is not None), default=None)
        infos = top_logprobs(logits, tokens, want) if want is not None else [None] * len(seqs)
        return [SampledToken(q, int(t), info if q.params.logprobs is not None else None)
                for q, t, info in zip(seqs, tokens.tolist(), infos)]

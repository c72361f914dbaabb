"""Per-request edits of the logits before sampling, in vLLM's order: OpenAI's `logit_bias`, the
repetition, frequency and presence penalties, then the structured-output grammar's mask (last,
so that nothing can make a disallowed token win again).
"""

import torch

from scalesim.engine.grammar import mask_disallowed
from scalesim.engine.sequence import Sequence


def needs_processing(seq: Sequence) -> bool:
    return bool(seq.params.logit_bias) or seq.params.penalized or seq.grammar is not None


def _penalize(row: torch.Tensor, seq: Sequence) -> None:
    """OpenAI's penalties on the completion's tokens, vLLM's repetition penalty on every token seen."""
    params = seq.params
    if params.presence_penalty or params.frequency_penalty:
        output = torch.tensor(seq.output_token_ids, dtype=torch.long, device=row.device)
        counts = torch.bincount(output, minlength=row.shape[0])[:row.shape[0]].to(row.dtype)
        row -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(row.dtype)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=row.device)
        values = row[seen]
        row[seen] = torch.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)


def process_logits(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Apply each row's logit bias, penalties and grammar (in place); other rows are untouched."""
    for i, seq in enumerate(seqs):
        bias = seq.params.logit_bias
        if bias:
            ids = torch.tensor(list(bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(bias.values()), device=logits.device, dtype=logits.dtype)
        if seq.params.penalized:
            _penalize(logits[i], seq)
    constrained = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
    if constrained:
        mask_disallowed(logits, constrained, [seqs[i].grammar for i in constrained])
    return logits

"""Turn logits into tokens: greedy, temperature, top-k, top-p, min-p, with per-request seeds.

Filtering is batched; the final draw is one `torch.multinomial` per sampled row so that a seeded
request draws from its own generator and gets the same tokens whatever it is batched with.
"""

import torch

from scalesim.device_tensors import device_tensor
from scalesim.layers.fused import greedy_rows
from scalesim.sampling_params import SamplingParams

MIN_LOGPROB = -9999.0


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) everything outside each row's top-k and top-p nucleus, and every token less
    likely than min_p times the row's most likely token."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
    drop = ranks >= k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= top_p.unsqueeze(1)
    drop |= probs < min_p.unsqueeze(1) * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """One token id per row of `logits` [B, vocab] (float32), and which rows could not be sampled
    [B] (their token is meaningless): one broken row never stops the others. Both stay on the
    logits' device, read by the caller in one transfer: nothing here waits for the device."""
    tokens, failed = greedy_rows(logits)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        vocab = logits.shape[-1]
        device = logits.device
        index = device_tensor(rows, device)
        sub = logits.index_select(0, index)
        temperature = device_tensor([params[i].temperature for i in rows], device).unsqueeze(1)
        top_k = device_tensor([min(params[i].top_k, vocab) for i in rows], device)
        top_p = device_tensor([params[i].top_p for i in rows], device, sub.dtype)
        min_p = device_tensor([params[i].min_p for i in rows], device, sub.dtype)
        probs = _filter(sub / temperature, top_k, top_p, min_p).softmax(dim=-1)
        broken = ~probs.amax(dim=-1).isfinite()
        failed[index] |= broken
        probs = torch.where(broken.unsqueeze(1), torch.ones_like(probs), probs)  # a failed row draws harmlessly
        drawn = torch.empty(len(rows), dtype=tokens.dtype, device=logits.device)
        for j, row in enumerate(rows):  # each row from its own generator: the same tokens in any batch
            drawn[j:j + 1] = torch.multinomial(probs[j], 1, generator=generators[row])
        tokens.index_copy_(0, index, drawn)
    return tokens, failed


def top_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[dict]:
    """For each row: the chosen token's logprob and the k most likely alternatives."""
    logprobs = logits.log_softmax(dim=-1).clamp(min=MIN_LOGPROB)  # masked tokens (-inf) as OpenAI's floor
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    top_values, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (None, None)
    token_ids, chosen = tokens.tolist(), chosen.tolist()  # read once, not per row
    top_ids, top_values = (top_ids.tolist(), top_values.tolist()) if k > 0 else (None, None)
    out = []
    for i in range(logits.shape[0]):
        top = {} if k == 0 else dict(zip(top_ids[i], top_values[i]))
        out.append({"token_id": token_ids[i], "logprob": chosen[i], "top": top})
    return out

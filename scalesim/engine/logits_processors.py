"""Per-request edits of the logits before sampling: OpenAI's `logit_bias`, and JSON mode.

JSON mode keeps, of the `JSON_CANDIDATES` most likely tokens, those whose text keeps the output
a prefix of a JSON object (single-character tokens when none does), and only end-of-sequence
once the object is closed. The model's own preferences still choose among the valid tokens.
"""

from functools import cached_property

import torch

from scalesim.engine.sequence import Sequence

JSON_CANDIDATES = 64


class TokenTexts:
    """The text of every token id, decoded once on first use."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)

    @cached_property
    def texts(self) -> list[str]:
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in range(self.vocab_size)]

    @cached_property
    def single_chars(self) -> list[int]:
        return [i for i, text in enumerate(self.texts) if len(text) == 1 and i not in self.special]

    @cached_property
    def special(self) -> frozenset[int]:
        """Control tokens (end of turn, tool tags, ...): text that must never count as JSON."""
        return frozenset(i for i, text in enumerate(self.texts)
                         if text and not self.tokenizer.decode([i], skip_special_tokens=True))


def _json_allowed(seq: Sequence, row: torch.Tensor, texts: TokenTexts) -> list[int]:
    if seq.json.done:
        return texts.eos_token_ids
    candidates = row.topk(min(JSON_CANDIDATES, row.shape[0])).indices.tolist()
    allowed = [t for t in candidates if t not in texts.special and seq.json.accepts(texts.texts[t])]
    return allowed or [t for t in texts.single_chars if seq.json.accepts(texts.texts[t])]


def process_logits(logits: torch.Tensor, seqs: list[Sequence], texts: TokenTexts) -> torch.Tensor:
    """Apply each row's logit bias and JSON constraint (in place); rows without either are untouched."""
    for i, seq in enumerate(seqs):
        bias = seq.params.logit_bias
        if bias:
            ids = torch.tensor(list(bias), device=logits.device)
            logits[i, ids] += torch.tensor(list(bias.values()), device=logits.device, dtype=logits.dtype)
        if seq.json is not None:
            allowed = torch.tensor(_json_allowed(seq, logits[i], texts), device=logits.device, dtype=torch.long)
            kept = logits[i, allowed]
            logits[i] = float("-inf")
            logits[i, allowed] = kept
    return logits


def advance_constraints(seqs: list[Sequence], tokens: list[int], texts: TokenTexts) -> None:
    """Feed each JSON-mode sequence the text of the token it just sampled."""
    for seq, token in zip(seqs, tokens):
        if seq.json is not None and not seq.json.done and token not in texts.eos_token_ids:
            seq.json.advance(texts.texts[token])

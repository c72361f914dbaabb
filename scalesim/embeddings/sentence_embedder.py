"""A sentence-transformers model folder, run with transformers: the encoder, then the pooling its
`1_Pooling/config.json` names, then L2 normalisation where its `modules.json` lists a Normalize
module. This is what `SentenceTransformer(folder).encode(texts)` computes, without the library.

Texts longer than the folder's `max_seq_length` (sentence_bert_config.json) are truncated to it,
as sentence-transformers does. Token-id inputs are taken as they are, special tokens included.
"""

import json
import threading
from pathlib import Path

import torch

from scalesim.errors import InvalidRequestError, ModelLoadError

DEFAULT_BATCH_SIZE = 32  # sentence-transformers' encode() default


class SentenceEmbedder:
    """`embed(inputs)` -> one vector per input ([N, dimensions] float32) and the tokens each used.

    Thread-safe: calls are serialised (the encoder's threads are the machine's cores)."""

    def __init__(self, folder: str | Path, name: str, batch_size: int = DEFAULT_BATCH_SIZE) -> None:
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        self.name, self.batch_size = name, batch_size
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
            modules = json.loads((folder / "modules.json").read_text())
            pooling_dir = next(folder / m["path"] for m in modules if m["type"].endswith(".Pooling"))
            pooling = json.loads((pooling_dir / "config.json").read_text())
        except (OSError, ValueError, StopIteration, KeyError) as exc:
            raise ModelLoadError(f"{folder} is not a sentence-transformers folder (config.json, modules.json, "
                                 f"a Pooling module): {exc}") from exc
        modes = [m for m in POOLERS if pooling.get(f"pooling_mode_{m}")]
        if len(modes) != 1:
            raise ModelLoadError(f"{pooling_dir}/config.json: exactly one pooling mode of {list(POOLERS)} is "
                                 f"supported, got {modes or 'none'}")
        self.pooling = modes[0]
        self.normalize = any(m["type"].endswith(".Normalize") for m in modules)
        self.dimensions = int(pooling["word_embedding_dimension"])
        settings = folder / "sentence_bert_config.json"
        configured = json.loads(settings.read_text()).get("max_seq_length") if settings.exists() else None
        self.max_tokens = int(configured or min(self.tokenizer.model_max_length,
                                                self.model.config.max_position_embeddings))
        self.vocab_size = self.model.config.vocab_size
        self._lock = threading.Lock()

    def tokenize(self, item: str | list[int]) -> list[int]:
        """The token ids `item` is embedded from: a text's, truncated to max_tokens, or the ids given."""
        if isinstance(item, str):
            return self.tokenizer(item, truncation=True, max_length=self.max_tokens)["input_ids"]
        if not item:
            raise InvalidRequestError("a token-id input must not be empty")
        if len(item) > self.max_tokens:
            raise InvalidRequestError(f"a token-id input has {len(item)} tokens; this model takes at most "
                                      f"{self.max_tokens}")
        if any(not 0 <= t < self.vocab_size for t in item):
            raise InvalidRequestError(f"token ids must be in [0, {self.vocab_size}) for {self.name}")
        return list(item)

    def embed(self, inputs: list[str | list[int]]) -> tuple[torch.Tensor, list[int]]:
        """Vectors [len(inputs), dimensions] in input order, and each input's token count."""
        ids = [self.tokenize(item) for item in inputs]
        out = torch.empty(len(ids), self.dimensions)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batches of similar length pad little
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), self.batch_size):
                rows = order[start:start + self.batch_size]
                out[rows] = self._encode([ids[i] for i in rows])
        return out, [len(i) for i in ids]

    def _encode(self, batch: list[list[int]]) -> torch.Tensor:
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
        hidden = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooled = POOLERS[self.pooling](hidden, mask.unsqueeze(-1).to(hidden.dtype))
        return torch.nn.functional.normalize(pooled, p=2, dim=1) if self.normalize else pooled


def _mean(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)


def _last(hidden: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return hidden[torch.arange(hidden.shape[0]), keep.squeeze(-1).sum(dim=1).long() - 1]


# sentence-transformers' Pooling modes: [B, T, D] token states and keep [B, T, 1] (1 for a real
# token, 0 for padding) -> [B, D]
POOLERS = {
    "cls_token": lambda hidden, keep: hidden[:, 0],
    "mean_tokens": _mean,
    "max_tokens": lambda hidden, keep: hidden.masked_fill(keep == 0, float("-inf")).amax(dim=1),
    "mean_sqrt_len_tokens": lambda hidden, keep: (hidden * keep).sum(dim=1) / keep.sum(dim=1).sqrt(),
    "lasttoken": _last,
}

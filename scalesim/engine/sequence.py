"""One sequence being generated: its tokens, its KV pages and where it stands."""

import enum
import time
from dataclasses import dataclass, field

import llguidance
import torch

from scalesim.engine.radix_cache import RadixNode
from scalesim.sampling_params import SamplingParams
from scalesim.weights.lora import LoRAAdapter
from scalesim.weights.private_model import PrivateModel


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A prompt plus the tokens generated so far.

    `num_computed_tokens` tokens have KV in `block_table`; the first `num_cached_tokens` of them
    came from the radix cache. `cache_node` is the radix node this sequence holds locked.
    """

    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    agent_id: str | None = None
    namespace: str = ""
    eos_token_ids: frozenset[int] = frozenset()
    want_prompt_logits: bool = False
    adapter: LoRAAdapter | None = None
    private_model: PrivateModel | None = None
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    cache_node: RadixNode | None = None
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    prompt_logits: list[torch.Tensor] = field(default_factory=list)
    arrival_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None
    num_preemptions: int = 0
    grammar: llguidance.LLMatcher | None = None  # structured output: where the output stands in its grammar
    draft_kept: int = 0    # speculative decoding: drafted tokens kept
    draft_missed: int = 0  # and steps whose draft had a rejected token

    @property
    def weights(self) -> tuple:
        """The per-agent weight handles this sequence runs with (adapter and/or private model)."""
        return tuple(h for h in (self.adapter, self.private_model) if h is not None)

    @property
    def weights_on_device(self) -> bool:
        return all(h.on_device for h in self.weights)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

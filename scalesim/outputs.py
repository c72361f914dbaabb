"""What generation returns: per-step deltas for streaming and whole results for batch calls."""

from dataclasses import dataclass, field


@dataclass
class SequenceDelta:
    """What one step added to completion `index` of a request."""

    request_id: str
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str | None = None  # why, when finish_reason is "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # why, when finish_reason is "error"

    def add(self, delta: SequenceDelta) -> None:
        self.error = delta.error or self.error
        self.text += delta.text
        self.token_ids.extend(delta.token_ids)
        self.logprobs.extend(delta.logprobs)
        self.finish_reason = delta.finish_reason or self.finish_reason


@dataclass
class RequestOutput:
    """The result of one request: `n` completions plus timing and cache facts."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    agent_id: str | None = None
    num_cached_tokens: int = 0
    arrival_s: float = 0.0
    first_token_s: float | None = None
    finished_s: float | None = None

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

"""How to sample one request: the knobs users know from vLLM and the OpenAI API."""

from dataclasses import dataclass, field

from scalesim.errors import InvalidRequestError

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_N = 16
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds
MAX_LOGIT_BIAS_ENTRIES = 300
GREEDY_BELOW_TEMPERATURE = 1e-5  # as vLLM: dividing logits by less overflows or underflows float32


@dataclass
class SamplingParams:
    """Sampling settings of one request.

    temperature 0 (or below 1e-5, where dividing the logits by it is not finite) means greedy.
    top_p in (0, 1], top_k 0 or -1 means off, a top_k over the vocabulary keeps it all. A `seed` makes the
    request's samples reproducible regardless of what it is batched with; with n > 1 completion i
    uses seed + i. `min_p` drops tokens less likely than min_p times the most likely one.
    Penalties, as OpenAI and vLLM define them: `presence_penalty` is subtracted from the logit of
    every token the completion has produced, `frequency_penalty` once per time it has;
    `repetition_penalty` (vLLM's) divides positive and multiplies negative logits of tokens in
    the prompt or the completion. Generation ends at max_tokens, at a stop string (cut from the text), at a stop
    token id, or at the model's end-of-sequence token unless ignore_eos.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # an llguidance grammar the output must match (scalesim.engine.grammar)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= 100:
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1, 0 (off) or a positive integer, got {self.top_k!r}")
        if not isinstance(self.min_p, (int, float)) or not 0 <= self.min_p <= 1:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2 <= value <= 2:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value!r}")
        if not isinstance(self.repetition_penalty, (int, float)) or not 0 < self.repetition_penalty <= 2:
            raise InvalidRequestError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty!r}")
        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be an integer in [1, {MAX_N}], got {self.n!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed <= MAX_SEED - self.n):
            raise InvalidRequestError(f"seed must be an integer in [0, {MAX_SEED - self.n}], got {self.seed!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for stop in self.stop:
            if not isinstance(stop, str) or not stop or len(stop) > MAX_STOP_STRING_CHARS:
                raise InvalidRequestError(
                    f"each stop string must be a non-empty string of at most {MAX_STOP_STRING_CHARS} characters")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be non-negative integers")
        if not isinstance(self.logit_bias, dict) or len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES or any(
                not isinstance(t, int) or t < 0 or not isinstance(b, (int, float)) or not -100 <= b <= 100
                for t, b in self.logit_bias.items()):
            raise InvalidRequestError(f"logit_bias must map at most {MAX_LOGIT_BIAS_ENTRIES} token ids to "
                                      "biases in [-100, 100]")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise InvalidRequestError(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or self.repetition_penalty != 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    def seed_for(self, index: int) -> int | None:
        """The seed of completion `index` of this request."""
        return None if self.seed is None else self.seed + index

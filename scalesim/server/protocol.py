"""Request bodies of the OpenAI API as real clients send them.

Unknown fields are ignored (clients send many: `reasoning_effort`, `verbosity`, ...);
known fields are type-checked, so a wrong type is a 400 naming the field. Every string of a body,
known field or not, must be valid Unicode (no lone surrogates): a 400 names the first that is not.
ScaleSim's extensions are `agent_id`, `ignore_eos`, and vLLM's `top_k`, `min_p` and
`repetition_penalty`, sent by openai clients through `extra_body`.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from scalesim.text import MAX_AGENT_ID_CHARS, first_invalid_text


class _Body(BaseModel):
    """A request body: refused whole when any of its strings is not valid text."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data):
        where = first_invalid_text(data)
        if where is not None:
            raise PydanticCustomError("invalid_text", "{where}: holds a lone surrogate (invalid Unicode); send "
                                      "valid UTF-8 text", {"where": where})
        return data


class _Lenient(_Body):
    model_config = ConfigDict(extra="ignore")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class _Sampling(_Lenient):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: StrictInt = 1
    max_tokens: StrictInt | None = None
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    agent_id: str | None = None
    ignore_eos: StrictBool = False
    logit_bias: dict[str, float] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: StrictInt | None = None
    echo: StrictBool = False


class EmbeddingRequest(_Lenient):
    """`POST /v1/embeddings`: `input` a text, texts, token ids or lists of token ids."""

    model: str
    input: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = None
    user: str | None = None


class AgentCreate(_Body):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, max_length=MAX_AGENT_ID_CHARS)
    adapter: str | None = None  # a name loaded at start-up (--lora-modules), instead of a path
    model: str | None = None  # a private model loaded at start-up (--private-models)
    adapter_path: str | None = None
    model_path: str | None = None
    prefix: str | None = None
    system: str | None = None  # the agent's system message: its rendered turn becomes the prefix


class HintBatch(BaseModel):
    """`POST /v1/hints`: the Python `hint()` API over HTTP (see scalesim.distance.hints). Parsed
    from the raw bytes by pydantic's JSON parser, which refuses lone surrogates itself, so a hint
    naming a million agents is not walked again."""

    model_config = ConfigDict(extra="forbid")
    step: StrictInt | None = None
    distances: dict[str, float] | None = None
    schedule: dict[str, float] | None = None
    plans: dict[str, float] | None = None
    probabilities: dict[str, float] | None = None
    active: list[str] | None = None
    turn_order: list[str] | None = None
    frontier: list[str] | None = None
    graph: dict[str, list[str]] | None = None
    positions: dict[str, list[float]] | None = None
    speed: float | None = None
    cooldowns: dict[str, float] | None = None


class PaperUpdate(_Body):
    """`POST /v1/update` in the ScaleSim paper's shape."""

    model_config = ConfigDict(extra="forbid")
    agent_data: dict[str, float] | None = None
    timestep_data: dict[str, list[str]] | None = None
    timestep_cnt: StrictInt | None = None


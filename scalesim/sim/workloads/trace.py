"""What a workload generator emits: agents, and per step the calls, their dependencies, and the
hints a real simulation would know at that point. The true future (for `oracle`) is derived."""

from dataclasses import dataclass, field


@dataclass
class AgentSpec:
    """An agent's private state: its system prompt (persona), and optionally which adapter
    cluster it uses (agents of one cluster share a LoRA) or a private model of its own."""

    agent_id: str
    system: str
    adapter_cluster: int | None = None
    private_model: bool = False
    history_turns: int | None = None  # keep only the last N turns (sliding window); None = all


@dataclass
class Call:
    """One model call: the agent's next user message; it starts after the calls in `after`
    (indices into the step's calls) have replied, and their replies may be quoted into it."""

    agent_id: str
    user: str
    max_tokens: int
    after: list[int] = field(default_factory=list)
    quote_replies: bool = False


@dataclass
class Step:
    index: int
    calls: list[Call]
    hints: dict = field(default_factory=dict)  # keyword arguments of LLM.hint for this step


@dataclass
class Trace:
    name: str
    agents: list[AgentSpec]
    steps: list[Step]
    max_concurrency: int = 64

    def future(self) -> dict[str, list[float]]:
        """The true steps at which each agent calls (what the `oracle` policy is given)."""
        calls: dict[str, list[float]] = {}
        for step in self.steps:
            for call in step.calls:
                calls.setdefault(call.agent_id, []).append(float(step.index))
        return calls

    @property
    def num_calls(self) -> int:
        return sum(len(s.calls) for s in self.steps)


@dataclass
class WorkloadConfig:
    """Parameters shared by every generator. `state`: none, lora-agent, lora-cluster or model."""

    agents: int = 40
    steps: int = 6
    seed: int = 0
    state: str = "none"
    clusters: int = 4
    output_tokens: int = 16

    def __post_init__(self) -> None:
        if self.state not in ("none", "lora-agent", "lora-cluster", "model"):
            raise ValueError(f"state must be none, lora-agent, lora-cluster or model, got {self.state!r}")
        if self.agents < 2 or self.steps < 1:
            raise ValueError("a workload needs at least 2 agents and 1 step")

    def agent_state(self, index: int) -> dict:
        if self.state == "lora-agent":
            return {"adapter_cluster": index}
        if self.state == "lora-cluster":
            return {"adapter_cluster": index % self.clusters}
        if self.state == "model":
            return {"private_model": True}
        return {}

"""`feed`: OASIS social media. Each agent activates with its own probability per step (heavy
tailed: a few very active, most rarely), makes one call with its feed as observation, and
keeps an append-only history; a barrier ends each step. Hints: the probabilities, and the
active set of the step (OASIS knows it before dispatching)."""

import random

from scalesim.sim.workloads.text import observation, persona
from scalesim.sim.workloads.trace import AgentSpec, Call, Step, Trace, WorkloadConfig

HEADER = "You are a user of a social media platform. Choose one action: post, like, repost, follow or do nothing.\n"
PARETO_SHAPE = 1.5
MIN_PROBABILITY = 0.05


def generate(cfg: WorkloadConfig) -> Trace:
    rng = random.Random(cfg.seed)
    agents = [AgentSpec(f"feed-{i}", HEADER + persona(rng, i), **cfg.agent_state(i)) for i in range(cfg.agents)]
    probability = {a.agent_id: min(1.0, MIN_PROBABILITY * rng.paretovariate(PARETO_SHAPE)) for a in agents}
    steps = []
    for index in range(cfg.steps):
        active = [a for a, p in probability.items() if rng.random() < p]
        calls = [Call(a, "Your feed: " + observation(rng, 30), cfg.output_tokens) for a in active]
        steps.append(Step(index, calls, {"probabilities": dict(probability), "active": active}))
    return Trace("feed", agents, steps, max_concurrency=128)

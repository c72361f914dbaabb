"""`city`: AgentSociety. Agents sleep until a known wake step, then make a chain of 3-10
sequential calls. Messages between agents start unpredictable cascades: a receiver replies in
the next step (up to a depth), which no hint announces — the learned fallback has to cope.
Hints: the wake steps (schedule) only."""

import random

from scalesim.sim.workloads.text import observation, persona
from scalesim.sim.workloads.trace import AgentSpec, Call, Step, Trace, WorkloadConfig

HEADER = "You are a resident of a large city. Reply in one short JSON object with your next action.\n"
CHAIN_CALLS = (3, 6)
MESSAGE_PROBABILITY = 0.3
MAX_CASCADE_DEPTH = 3


def generate(cfg: WorkloadConfig) -> Trace:
    rng = random.Random(cfg.seed)
    agents = [AgentSpec(f"city-{i}", HEADER + persona(rng, i), **cfg.agent_state(i)) for i in range(cfg.agents)]
    ids = [a.agent_id for a in agents]
    wake = {a: rng.randint(0, 3) for a in ids}
    inbox: dict[int, list[tuple[str, int]]] = {}
    steps = []
    for index in range(cfg.steps):
        calls: list[Call] = []
        hints = {"schedule": dict(wake)}  # as known when the step starts; messages are not announced
        for agent in [a for a in ids if wake[a] == index]:
            for k in range(rng.randint(*CHAIN_CALLS)):
                calls.append(Call(agent, observation(rng, 15) + " What next?", cfg.output_tokens,
                                  after=[len(calls) - 1] if k else []))
            wake[agent] = index + rng.randint(2, 5)
            if rng.random() < MESSAGE_PROBABILITY:
                inbox.setdefault(index + 1, []).append((rng.choice(ids), 1))
        for receiver, depth in inbox.pop(index, []):
            calls.append(Call(receiver, "You received a message from a neighbour. Reply.", cfg.output_tokens))
            if depth < MAX_CASCADE_DEPTH and rng.random() < 0.5:
                inbox.setdefault(index + 1, []).append((rng.choice(ids), depth + 1))
        steps.append(Step(index, calls, hints))
    return Trace("city", agents, steps, max_concurrency=64)

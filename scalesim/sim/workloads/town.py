"""`town`: Smallville (Generative Agents). Agents follow schedules of actions with known end
steps; when an action ends the agent makes a short burst of sequential calls (perceive, plan,
react). Co-located agents sometimes talk: a strictly sequential exchange quoting each reply.
Hints: each agent's next action end (schedule) and its place on the map (positions)."""

import random

from scalesim.sim.workloads.text import PLACES, observation, persona
from scalesim.sim.workloads.trace import AgentSpec, Call, Step, Trace, WorkloadConfig

HEADER = ("You are a character in a small town simulation. Stay in character and answer briefly, "
          "in the first person, with one concrete next action.\n")
BURST_CALLS = ("Perceive: what do you notice?", "Plan: what do you do next?", "React: anything to change?")
TALK_PROBABILITY = 0.3
TALK_TURNS = 4


def generate(cfg: WorkloadConfig) -> Trace:
    rng = random.Random(cfg.seed)
    agents = [AgentSpec(f"town-{i}", HEADER + persona(rng, i), **cfg.agent_state(i)) for i in range(cfg.agents)]
    ends = {a.agent_id: rng.randint(0, 3) for a in agents}
    place = {a.agent_id: rng.randrange(len(PLACES)) for a in agents}
    steps = []
    for index in range(cfg.steps):
        calls: list[Call] = []
        busy = {a: float(end - index) for a, end in ends.items() if end > index}  # mid-action: no chat before it ends
        hints = {"schedule": dict(ends), "positions": {a: [float(p), 0.0] for a, p in place.items()}, "speed": 1.0,
                 "cooldowns": busy}
        due = [a.agent_id for a in agents if ends[a.agent_id] == index]
        for agent in due:
            place[agent] = rng.randrange(len(PLACES))
            for k, question in enumerate(BURST_CALLS):
                after = [len(calls) - 1] if k else []
                calls.append(Call(agent, f"{observation(rng)} You are at {PLACES[place[agent]]}. {question}",
                                  cfg.output_tokens, after=after))
            ends[agent] = index + rng.randint(1, 4)
        if len(due) >= 2 and rng.random() < TALK_PROBABILITY:
            a, b = rng.sample(due, 2)
            for turn in range(TALK_TURNS):
                speaker = (a, b)[turn % 2]
                calls.append(Call(speaker, "Continue the conversation with the other person:", cfg.output_tokens,
                                  after=[len(calls) - 1], quote_replies=True))
        steps.append(Step(index, calls, hints))  # hints as known when the step starts
    return Trace("town", agents, steps, max_concurrency=32)

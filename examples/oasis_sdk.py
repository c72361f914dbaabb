"""The same OASIS-style loop with the ScaleSim SDK: named agents, persona pre-fill, and hints.

Start a server first:  scalesim serve smollm2-135m --port 8000
The simulation decides who is active before it dispatches a step, so it tells the server: the
active agents call now (distance 0), the others with their activation probability.
"""

import os
import random

from scalesim.sim import Simulation

sim = Simulation(os.environ.get("SCALESIM_URL", "http://127.0.0.1:8000"))
profiles = {f"user{i}": f"You are User{i}, a Reddit user who cares about topic {i % 3}." for i in range(20)}
for agent, profile in profiles.items():
    sim.add_agent(agent, system=profile)  # its persona's KV is computed now, once
histories = {a: [{"role": "system", "content": p}] for a, p in profiles.items()}
rng = random.Random(0)
for step in range(3):
    active = [a for a in profiles if rng.random() < 0.3]
    sim.step(step, active=active, probabilities={a: 0.3 for a in profiles})
    for agent in active:
        histories[agent].append({"role": "user", "content": f"Step {step}: your feed shows 3 new posts. React."})
        reply = sim.client(agent).chat.completions.create(model=sim.model, messages=histories[agent], max_tokens=32)
        histories[agent].append({"role": "assistant", "content": reply.choices[0].message.content})
        print(step, agent, reply.choices[0].message.content[:60].replace("\n", " "))

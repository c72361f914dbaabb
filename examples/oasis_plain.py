"""An OASIS-style loop with the plain openai client: ScaleSim needs no change to the simulation.

Start a server first:  scalesim serve smollm2-135m --port 8000
Each agent's system message is its profile; the server derives a stable agent id from it.
"""

import os
import random

from openai import OpenAI

URL, MODEL = os.environ.get("SCALESIM_URL", "http://127.0.0.1:8000"), os.environ.get("SCALESIM_MODEL", "smollm2-135m")
client = OpenAI(base_url=URL + "/v1", api_key="Not_Used")
profiles = {f"user{i}": f"You are User{i}, a Reddit user who cares about topic {i % 3}." for i in range(20)}
histories = {a: [{"role": "system", "content": p}] for a, p in profiles.items()}
rng = random.Random(0)
for step in range(3):
    for agent in [a for a in profiles if rng.random() < 0.3]:  # who is active this step
        histories[agent].append({"role": "user", "content": f"Step {step}: your feed shows 3 new posts. React."})
        reply = client.chat.completions.create(model=MODEL, messages=histories[agent], max_tokens=32)
        histories[agent].append({"role": "assistant", "content": reply.choices[0].message.content})
        print(step, agent, reply.choices[0].message.content[:60].replace("\n", " "))

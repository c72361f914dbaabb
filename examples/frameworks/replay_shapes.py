"""Replay the request shapes of five unmodified frameworks against a running ScaleSim server and
print whom the server took each call for (the X-Agent-Id response header), beside the true agent.

    scalesim serve smollm2-135m --port 8000 &
    python examples/frameworks/replay_shapes.py werewolf

No agent id is sent: the server infers one from where each prompt parts ways with the others.
Pass --explicit to send the one line that makes identity exact instead (the `user` field).
"""

import argparse
import random

import httpx

from scalesim.sim.framework_shapes import SHAPES, purity_and_splitting

parser = argparse.ArgumentParser()
parser.add_argument("shape", choices=sorted(SHAPES))
parser.add_argument("--url", default="http://127.0.0.1:8000")
parser.add_argument("--model", default="smollm2-135m")
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--explicit", action="store_true", help="send user=<agent> (exact identity)")
args = parser.parse_args()

calls = SHAPES[args.shape](random.Random(0), args.steps)
truth, named = [], []
for agent, messages in calls:
    body = {"model": args.model, "messages": messages, "max_tokens": 8}
    if args.explicit:
        body["user"] = agent  # the one line: any stable per-agent string
    reply = httpx.post(args.url + "/v1/chat/completions", json=body, timeout=120)
    reply.raise_for_status()
    truth.append(agent)
    named.append(reply.headers.get("x-agent-id"))
    print(f"{agent:>18} -> {named[-1]}")
purity, splitting = purity_and_splitting(truth, named)
print(f"{len(calls)} calls, {len(set(truth))} agents, {len(set(named))} ids: purity {purity:.3f}, "
      f"splitting {splitting:.3f}")

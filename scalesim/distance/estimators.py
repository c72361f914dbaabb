"""Estimators of invocation distance: small pure functions from simulation facts to
{agent: steps until its next call}. Their results are combined by minimum (DESIGN.md)."""

import math
from collections import deque
from collections.abc import Iterable, Mapping

INF = math.inf


def explicit(distances: Mapping[str, float]) -> dict[str, float]:
    """Distances given directly (non-negative numbers, validated by the caller)."""
    return dict(distances)


def schedule(next_steps: Mapping[str, float], current_step: int) -> dict[str, float]:
    """The simulation knows the exact step of each agent's next call (a wake time, a plan end)."""
    return {a: max(0.0, float(s) - current_step) for a, s in next_steps.items()}


def plans(remaining_steps: Mapping[str, float]) -> dict[str, float]:
    """An agent busy with an action of known remaining duration calls when it ends."""
    return explicit(remaining_steps)


def random_activation(probabilities: Mapping[str, float], active: Iterable[str] = ()) -> dict[str, float]:
    """Each agent wakes with probability p per step: expected wait 1/p; announced actives call now."""
    out = {a: (1.0 / p if p > 0 else INF) for a, p in probabilities.items()}
    out.update({a: 0.0 for a in active})
    return out


def turn_order(queue: Iterable[str]) -> dict[str, float]:
    """Round-based games: an agent's distance is its position in the turn queue."""
    out: dict[str, float] = {}
    for position, agent in enumerate(queue):
        out.setdefault(agent, float(position))
    return out


def activation_path(frontier: Iterable[str], graph: Mapping[str, Iterable[str]]) -> dict[str, float]:
    """Activation spreading on a graph: hops from the current frontier (breadth-first)."""
    hops = {a: 0.0 for a in frontier}
    queue = deque(hops)
    while queue:
        agent = queue.popleft()
        for neighbour in graph.get(agent, ()):
            if neighbour not in hops:
                hops[neighbour] = hops[agent] + 1
                queue.append(neighbour)
    return hops


def interaction(positions: Mapping[str, tuple[float, float]], speed: float,
                cooldowns: Mapping[str, float] | None = None) -> dict[str, float]:
    """Agents moving in space meet and talk: cooldown left, else the steps until the nearest
    other agent could be reached, both walking towards each other at `speed` per step."""
    cooldowns = cooldowns or {}
    agents = list(positions)
    out = {}
    for a in agents:
        if cooldowns.get(a, 0) > 0:
            out[a] = float(cooldowns[a])
            continue
        ax, ay = positions[a]
        nearest = min((math.dist((ax, ay), positions[b]) for b in agents if b != a), default=INF)
        out[a] = math.ceil(nearest / (2 * speed)) if speed > 0 and nearest < INF else INF
    return out


def paper_update(agent_data: Mapping[str, float] | None, timestep_data: Mapping[str, Iterable[str]] | None
                 ) -> dict[str, float]:
    """The ScaleSim paper's `/v1/update` shape: {agent_id: d} and {d: [agent_ids]}."""
    out = explicit(agent_data or {})
    for distance, agents in (timestep_data or {}).items():
        for agent in agents:
            out[agent] = min(out.get(agent, INF), max(0.0, float(distance)))
    return out


def combine(*estimates: Mapping[str, float]) -> dict[str, float]:
    """Per agent, the minimum over the estimators that know it."""
    out: dict[str, float] = {}
    for estimate in estimates:
        for agent, distance in estimate.items():
            out[agent] = min(out.get(agent, INF), distance)
    return out

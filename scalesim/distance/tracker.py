"""The per-agent invocation-distance table.

Distances are stored as the absolute step at which each agent is expected to call, so the decay
of every distance by one per simulation step costs nothing and keys built from them stay valid
between steps. An arriving request sets its agent's distance to 0 until it finishes; a hint stays in force
for the whole of its step (an agent may make a chain of calls in it) and is spent when the
simulation moves past it; without a hint, the agent's own learned inter-arrival time is used. Seconds per step (an EWMA of the time between hinted steps) converts a
distance into a deadline in seconds for prefetching.
"""

import math
import time
from dataclasses import dataclass

INF = math.inf
DEFAULT_SECONDS_PER_STEP = 1.0
EWMA_WEIGHT = 0.3


@dataclass
class _Agent:
    hinted_step: float = INF          # absolute step of the next call, from the estimators
    in_flight: int = 0
    last_arrival_s: float | None = None
    gap_s: float | None = None        # EWMA of this agent's inter-arrival time


class DistanceTracker:
    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.step = 0
        self.step_started_s = clock()
        self.seconds_per_step = DEFAULT_SECONDS_PER_STEP
        self.agents: dict[str, _Agent] = {}

    def _agent(self, agent_id: str) -> _Agent:
        return self.agents.setdefault(agent_id, _Agent())

    def advance(self, step: int) -> list[str]:
        """The simulation reached `step`: every distance shrinks by the steps that passed. Hints
        for steps now past are spent (the call came, or the simulation changed its mind); return
        the agents whose expected step changed other than by the shift."""
        if step <= self.step:
            return []
        now = self.clock()
        measured = (now - self.step_started_s) / (step - self.step)
        self.seconds_per_step = (1 - EWMA_WEIGHT) * self.seconds_per_step + EWMA_WEIGHT * measured
        self.step, self.step_started_s = step, now
        changed = []
        for agent_id, state in self.agents.items():
            if state.hinted_step < step:
                state.hinted_step = INF
                changed.append(agent_id)
            elif state.gap_s is not None:
                changed.append(agent_id)  # the learned estimate is relative to the step's start
        return changed

    def hint(self, distances: dict[str, float]) -> list[str]:
        """Set each named agent's distance (steps from now); return the agents that changed."""
        changed = []
        for agent_id, distance in distances.items():
            state = self._agent(agent_id)
            expected = self.step + distance
            if state.hinted_step != expected:
                state.hinted_step = expected
                changed.append(agent_id)
        return changed

    def on_request(self, agent_id: str) -> None:
        state = self._agent(agent_id)
        now = self.clock()
        if state.last_arrival_s is not None:
            gap = now - state.last_arrival_s
            state.gap_s = gap if state.gap_s is None else (1 - EWMA_WEIGHT) * state.gap_s + EWMA_WEIGHT * gap
        state.last_arrival_s = now
        state.in_flight += 1

    def on_finish(self, agent_id: str) -> None:
        state = self._agent(agent_id)
        state.in_flight = max(0, state.in_flight - 1)

    @staticmethod
    def _next_due_s(state: _Agent, after_s: float) -> float:
        """The agent's next expected arrival at or after `after_s`, taking its calls as periodic: an
        agent past its due time is expected one period later, not any moment now (an overdue
        estimate would otherwise hold its state on the device for ever)."""
        due_s = state.last_arrival_s + state.gap_s
        if due_s < after_s and state.gap_s > 0:
            due_s += math.ceil((after_s - due_s) / state.gap_s) * state.gap_s
        return due_s

    def expected_step(self, agent_id: str | None) -> float:
        """Absolute step of the agent's next call: now if in flight, else min(hint, learned)."""
        state = self.agents.get(agent_id) if agent_id is not None else None
        if state is None:
            return INF
        if state.in_flight:
            return float(self.step)
        learned = INF
        if state.gap_s is not None and state.last_arrival_s is not None:
            due_s = self._next_due_s(state, self.step_started_s)
            learned = self.step + max(0.0, due_s - self.step_started_s) / self.seconds_per_step
        return min(state.hinted_step, learned)

    def distance(self, agent_id: str | None) -> float:
        """Steps until the agent's next call (0 = now or in flight, inf = unknown)."""
        state = self.agents.get(agent_id) if agent_id is not None else None
        if state is None:
            return INF
        if state.in_flight:
            return 0.0
        learned = INF
        if state.gap_s is not None and state.last_arrival_s is not None:
            now = self.clock()
            learned = max(0.0, self._next_due_s(state, now) - now) / self.seconds_per_step
        return min(max(0.0, state.hinted_step - self.step), learned)

    def deadline_s(self, agent_id: str) -> float:
        """Seconds from now until the agent is expected to call."""
        return self.distance(agent_id) * self.seconds_per_step

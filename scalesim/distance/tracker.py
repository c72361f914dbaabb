"""The per-agent invocation-distance table, whose work follows change, never the population.

Every estimate is an absolute expected step, so the decay of all distances by one per simulation
step costs nothing and a key built from one stays valid until that agent's estimate changes:
- a hint sets the agent's hinted step; it stays in force for the whole of that step (an agent may
  make a chain of calls in it) and is spent once the simulation moves past it;
- an arriving request puts the agent at "now" (the step it arrived in) until it finishes;
- without a hint, the agent's own inter-arrival time (EWMA) gives a learned due step, fixed when
  the agent calls and moved on when it passes unmet: an overdue agent is expected a period later
  (not at any moment, or its state would be held for ever), and each further miss in a row
  doubles the wait, so an agent that went quiet costs O(log) updates, not one per period.
Spent hints and overdue learned estimates sit in two lazily invalidated heaps, so `advance` pops
exactly the agents whose expected step moved. Without steps (a plain OpenAI client) the step
clock is seconds since start: a hinted distance counts from now, and `refresh` spends hints and
moves overdue agents by the wall clock (the first simulation step re-expresses them as steps).

Agents are tracked once they have state (`track`) or call (`on_request`). Hints naming agents
not tracked yet are counted and the newest of them kept (at most twice `max_untracked`), so a
hint naming a million strangers costs a bounded amount of memory; a stranger who later gets
state takes its pending hint along.
"""

import heapq
import math
import time
from itertools import islice

INF = math.inf
DEFAULT_SECONDS_PER_STEP = 1.0
EWMA_WEIGHT = 0.3
DEFAULT_MAX_UNTRACKED_HINTS = 65_536


class _Agent:
    __slots__ = ("hinted_step", "in_flight", "in_flight_step", "last_arrival_s", "gap_s", "learned_step", "misses")

    def __init__(self, hinted_step: float = INF) -> None:
        self.hinted_step = hinted_step    # absolute step of the next call, from the estimators
        self.in_flight = 0
        self.in_flight_step = 0.0         # the step its oldest request in flight arrived in
        self.last_arrival_s: float | None = None
        self.gap_s: float | None = None   # EWMA of this agent's inter-arrival time
        self.learned_step = INF           # absolute step its learned next call is due
        self.misses = 0                   # learned due steps passed unmet in a row


class DistanceTracker:
    def __init__(self, clock=time.monotonic, max_untracked: int = DEFAULT_MAX_UNTRACKED_HINTS) -> None:
        self.clock = clock
        self.step = 0
        self.stepped = False  # a simulation step was ever hinted: steps, not seconds, are the clock
        self.started_s = self.step_started_s = clock()
        self.seconds_per_step = DEFAULT_SECONDS_PER_STEP
        self.agents: dict[str, _Agent] = {}
        self.untracked: dict[str, float] = {}  # agent -> hinted step, most recent last, bounded
        self.max_untracked = max_untracked
        self._hint_expiry: list[tuple[float, str]] = []   # (hinted step, agent), stale entries skipped
        self._learned_due: list[tuple[float, str]] = []   # (learned step, agent), stale entries skipped

    # --- who is tracked ------------------------------------------------------------------
    def track(self, agent_id: str) -> None:
        """The agent has state now: keep its estimates (with any pending hint it was given)."""
        if agent_id not in self.agents:
            state = self.agents[agent_id] = _Agent(self.untracked.pop(agent_id, INF))
            if state.hinted_step < INF:
                heapq.heappush(self._hint_expiry, (state.hinted_step, agent_id))

    # --- the clock -----------------------------------------------------------------------
    def now_step(self) -> float:
        """Where the clock stands: the current step, or without steps seconds since start."""
        if self.stepped:
            return float(self.step)
        return (self.clock() - self.started_s) / self.seconds_per_step

    def _step_of(self, time_s: float) -> float:
        """The absolute (fractional) step at which wall-clock time `time_s` falls, as of now."""
        origin_s = self.step_started_s if self.stepped else self.started_s
        return self.step + (time_s - origin_s) / self.seconds_per_step

    def advance(self, step: int) -> list[str]:
        """The simulation reached `step`: spend the hints of the steps now past and move overdue
        learned estimates a period on; return the agents whose expected step changed."""
        if step <= self.step and self.stepped:
            return []
        now = self.clock()
        changed = []
        if self.stepped:
            measured = (now - self.step_started_s) / (step - self.step)
            self.seconds_per_step = (1 - EWMA_WEIGHT) * self.seconds_per_step + EWMA_WEIGHT * measured
        else:
            changed = self.refresh()  # hints and overdue estimates move on the seconds clock first
            changed += self._rebase_to_steps(step, now)
        self.step, self.step_started_s, self.stepped = max(step, self.step), now, True
        return changed + self.refresh()

    def _rebase_to_steps(self, step: int, now_s: float) -> list[str]:
        """The first simulation step: learned estimates made on the seconds clock are re-expressed
        as steps after this one (once per process)."""
        now_virtual = (now_s - self.started_s) / self.seconds_per_step

        def rebased(expected: float) -> float:
            return step + max(0.0, expected - now_virtual)

        changed = []
        for agent_id, state in self.agents.items():
            if state.learned_step < INF or state.hinted_step < INF or state.in_flight:
                changed.append(agent_id)
            if state.learned_step < INF:
                state.learned_step = rebased(state.learned_step)
            if state.hinted_step < INF:
                state.hinted_step = rebased(state.hinted_step)
            if state.in_flight:
                state.in_flight_step = float(step)
        self._learned_due = [(s.learned_step, a) for a, s in self.agents.items() if s.learned_step < INF]
        self._hint_expiry = [(s.hinted_step, a) for a, s in self.agents.items() if s.hinted_step < INF]
        heapq.heapify(self._learned_due)
        heapq.heapify(self._hint_expiry)
        self.untracked = {a: rebased(h) for a, h in self.untracked.items()}
        return changed

    def refresh(self) -> list[str]:
        """Spend the hints for steps the clock has passed, and move every learned estimate it has
        passed unmet one period on; return the agents whose expected step changed."""
        now_step = self.now_step()
        changed = []
        while self._hint_expiry and self._hint_expiry[0][0] < now_step:
            hinted, agent_id = heapq.heappop(self._hint_expiry)
            state = self.agents.get(agent_id)
            if state is not None and state.hinted_step == hinted:
                state.hinted_step = INF
                changed.append(agent_id)
        while self._learned_due and self._learned_due[0][0] < now_step:
            due, agent_id = heapq.heappop(self._learned_due)
            state = self.agents.get(agent_id)
            if state is None or state.learned_step != due:
                continue
            period = state.gap_s / self.seconds_per_step
            if period <= 0:
                state.learned_step = INF
            else:
                while state.learned_step <= now_step:  # a period later, then twice as long each miss
                    state.learned_step += period * 2 ** state.misses
                    state.misses += 1
                heapq.heappush(self._learned_due, (state.learned_step, agent_id))
            changed.append(agent_id)
        return changed

    # --- estimates -----------------------------------------------------------------------
    def hint(self, distances: dict[str, float]) -> tuple[list[str], int]:
        """Set each named agent's distance (steps from now). Return the tracked agents whose
        expected step changed, and how many named agents are not tracked (kept, bounded)."""
        changed, strangers = [], {}
        base, agents = self.now_step(), self.agents  # without steps: seconds since start
        for agent_id, distance in distances.items():
            state = agents.get(agent_id)
            if state is None:
                strangers[agent_id] = base + distance
            elif state.hinted_step != base + distance:
                state.hinted_step = expected = base + distance
                if expected < INF:
                    heapq.heappush(self._hint_expiry, (expected, agent_id))
                changed.append(agent_id)
        if strangers:
            self._keep_untracked(strangers)
        self._compact()
        return changed, len(strangers)

    def _keep_untracked(self, hints: dict[str, float]) -> None:
        """Keep the newest `max_untracked` hints about agents not tracked (older ones are dropped
        in bulk, so the cost stays O(1) per hint)."""
        pending = self.untracked
        if len(hints) >= self.max_untracked:
            self.untracked = dict(islice(hints.items(), len(hints) - self.max_untracked, None))
            return
        for agent_id in hints:
            pending.pop(agent_id, None)
        pending.update(hints)
        if len(pending) > 2 * self.max_untracked:
            self.untracked = dict(islice(pending.items(), len(pending) - self.max_untracked, None))

    def on_request(self, agent_id: str) -> None:
        self.track(agent_id)
        state = self.agents[agent_id]
        now = self.clock()
        if state.last_arrival_s is not None:
            gap = now - state.last_arrival_s
            state.gap_s = gap if state.gap_s is None else (1 - EWMA_WEIGHT) * state.gap_s + EWMA_WEIGHT * gap
            state.learned_step = self._step_of(now + state.gap_s)
            state.misses = 0
            heapq.heappush(self._learned_due, (state.learned_step, agent_id))
            self._compact()
        state.last_arrival_s = now
        if not state.in_flight:
            state.in_flight_step = self.now_step()
        state.in_flight += 1

    def _compact(self) -> None:
        """Drop stale heap entries once they outnumber the live ones (amortised O(1) per push)."""
        limit = 2 * len(self.agents) + 1024
        if len(self._hint_expiry) > limit:
            self._hint_expiry = [(s, a) for s, a in self._hint_expiry
                                 if a in self.agents and self.agents[a].hinted_step == s]
            heapq.heapify(self._hint_expiry)
        if len(self._learned_due) > limit:
            self._learned_due = [(s, a) for s, a in self._learned_due
                                 if a in self.agents and self.agents[a].learned_step == s]
            heapq.heapify(self._learned_due)

    def on_finish(self, agent_id: str) -> None:
        state = self.agents.get(agent_id)
        if state is not None:
            state.in_flight = max(0, state.in_flight - 1)

    def expected_step(self, agent_id: str | None) -> float:
        """Absolute step of the agent's next call: its arrival step while in flight, else
        min(hint, learned). O(1)."""
        state = self.agents.get(agent_id) if agent_id is not None else None
        if state is None:
            hinted = self.untracked.get(agent_id, INF) if agent_id is not None else INF
            return hinted if hinted >= self.step else INF
        if state.in_flight:
            return state.in_flight_step
        return min(state.hinted_step, state.learned_step)

    def distance(self, agent_id: str | None) -> float:
        """Steps until the agent's next call (0 = now or in flight, inf = unknown), with an overdue
        learned estimate moved on as `refresh` will move it."""
        now_step = self.now_step()
        expected = self.expected_step(agent_id)
        state = self.agents.get(agent_id) if agent_id is not None else None
        if state is not None and not state.in_flight and expected == state.learned_step < now_step and state.gap_s:
            learned, misses, period = state.learned_step, state.misses, state.gap_s / self.seconds_per_step
            while learned <= now_step:
                learned += period * 2 ** misses
                misses += 1
            expected = min(state.hinted_step, learned)
        return max(0.0, expected - now_step)

    def is_tracked(self, agent_id: str) -> bool:
        return agent_id in self.agents

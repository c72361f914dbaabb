"""Seeded workload generators grounded in real simulation frameworks (see ../shared/WORKLOADS.md)."""

from scalesim.sim.workloads import city, feed, rounds, survey, town
from scalesim.sim.workloads.trace import AgentSpec, Call, Step, Trace, WorkloadConfig

WORKLOADS = {"town": town.generate, "feed": feed.generate, "survey": survey.generate, "city": city.generate,
             "rounds": rounds.generate}

__all__ = ["WORKLOADS", "AgentSpec", "Call", "Step", "Trace", "WorkloadConfig"]

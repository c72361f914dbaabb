"""Simulation workloads, the runner that drives them, and the SDK for simulation authors."""

from scalesim.sim.sdk import Simulation, SimulationError

__all__ = ["Simulation", "SimulationError"]

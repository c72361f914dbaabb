"""Simulation workloads, the runner that drives them, and (later) the SDK for simulation authors."""

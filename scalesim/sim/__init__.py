"""Simulation workloads, the runner that drives them, and the SDK for simulation authors.

The SDK (`Simulation`) is imported on first use: it needs the `openai` client, which the
workloads and the bench do not (a GPU machine may run the bench without it)."""

__all__ = ["Simulation", "SimulationError"]


def __getattr__(name: str):
    if name in __all__:
        from scalesim.sim import sdk
        return getattr(sdk, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

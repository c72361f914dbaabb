"""Registered agents: the adapter, private model and persona prefix each agent runs with."""

from dataclasses import dataclass


@dataclass
class Agent:
    agent_id: str
    adapter: str | None = None
    model: str | None = None
    prefix: str | None = None

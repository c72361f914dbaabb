"""`rounds`: Werewolf Arena / EconAgent. G games of 8 players run concurrently; each round is a
bid phase (all players), a speech (one player, after the bids) and a vote (all players, after
the speech). Players share the game's rules at the front of their prompt and keep a sliding
window of recent turns. Hints: the turn order of the coming phases is fully known."""

import random

from scalesim.sim.workloads.text import persona
from scalesim.sim.workloads.trace import AgentSpec, Call, Step, Trace, WorkloadConfig

PLAYERS_PER_GAME = 8
RULES = ("Werewolf rules: each night the wolves pick a victim; each day all players debate and vote one "
         "player out. Villagers win when the wolves are gone; wolves win when they equal the villagers. "
         "Answer with a short JSON object.\n")
ROLES = ["villager", "villager", "villager", "seer", "doctor", "villager", "werewolf", "werewolf"]
WINDOW_TURNS = 3


def generate(cfg: WorkloadConfig) -> Trace:
    rng = random.Random(cfg.seed)
    games = max(1, cfg.agents // PLAYERS_PER_GAME)
    agents = []
    for g in range(games):
        roles = rng.sample(ROLES, len(ROLES))
        for p in range(PLAYERS_PER_GAME):
            i = g * PLAYERS_PER_GAME + p
            agents.append(AgentSpec(f"game{g}-p{p}", RULES + f"Your role: {roles[p]}. " + persona(rng, i, 1),
                                    history_turns=WINDOW_TURNS, **cfg.agent_state(i)))
    steps = []
    for index in range(cfg.steps):
        calls: list[Call] = []
        for g in range(games):
            players = [a.agent_id for a in agents[g * PLAYERS_PER_GAME:(g + 1) * PLAYERS_PER_GAME]]
            speaker = rng.choice(players)
            bids = []
            for player in players:
                bids.append(len(calls))
                calls.append(Call(player, f"Round {index}: how eager are you to speak (0-4)?", cfg.output_tokens))
            calls.append(Call(speaker, "You won the bid. Make your statement.", cfg.output_tokens, after=bids))
            speech = len(calls) - 1
            for player in players:
                calls.append(Call(player, "Vote one player out.", cfg.output_tokens, after=[speech],
                                  quote_replies=True))
        steps.append(Step(index, calls, {"distances": {a.agent_id: 0 for a in agents}}))
    return Trace("rounds", agents, steps, max_concurrency=64)

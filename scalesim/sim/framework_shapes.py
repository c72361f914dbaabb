"""Request sequences in the shapes that unmodified frameworks send (../shared/WORKLOADS.md, "What
unmodified frameworks send"), with the true agent of every call: seeded, several agents, several
steps each, interleaved as the frameworks interleave them.

- oasis: a per-agent system message (the profile), then a feed that changes every step, the
  history appended; a random subset of agents is active each step.
- genagents: one user message: a shared header, the participant's interview (private, at the
  front), then one of many questions, question-major.
- werewolf: one user message: shared rules, the player's name and role, the phase's instructions
  and the shared transcript, which grows.
- concordia: the same system message and few-shot turns on every call, then the entity's own
  memories, or the game master's log.
- agentverse: one system message holding everything: the shared scene, the role, the chat
  history (shared, growing) and the instruction.
"""

import random

from scalesim.sim import oasis_requests as oasis

NAMES = ["Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana"]
ROLES = ["villager", "werewolf", "seer", "doctor", "villager", "werewolf", "villager", "villager"]
Call = tuple[str, list[dict]]  # (true agent, messages)


def _active(rng: random.Random, agents: list[str], share: float) -> list[str]:
    active = [a for a in agents if rng.random() < share] or [rng.choice(agents)]
    rng.shuffle(active)
    return active


def oasis_calls(rng: random.Random, steps: int) -> list[Call]:
    histories = {i: [{"role": "system", "content": oasis.profile(i)}] for i in range(len(NAMES))}
    calls = []
    for step in range(1, steps + 1):
        for i in _active(rng, list(histories), 0.7):
            histories[i] = histories[i] + [{"role": "user", "content": oasis.feed(step, i)}]
            calls.append((f"user{i}", histories[i]))
            histories[i] = histories[i] + [{"role": "assistant", "content": f"I like post {step + i}."}]
    return calls


def genagents_calls(rng: random.Random, questions: int) -> list[Call]:
    interviews = {name: "\n".join(f"Interviewer: {q}\n{name}: {a}" for q, a in (
        ("Tell me the story of your life.", f"I grew up in town {k} and became a {ROLES[k]} at {20 + k}."),
        ("How have you responded to stress?", f"I {'walk' if k % 2 else 'cook'} for {k + 1} hours."),
        ("What do you value?", f"Mostly {['family', 'work', 'faith', 'friends'][k % 4]} and honesty.")))
        for k, name in enumerate(NAMES)}
    calls = []
    for q in range(questions):  # every participant answers question q before anyone sees q + 1
        for name in rng.sample(NAMES, len(NAMES)):
            prompt = (f"Below is an interview with a study participant.\n{interviews[name]}\n\n"
                      f"Survey question {q}: on a scale of 1 to {5 + q}, how much do you trust your neighbours?\n"
                      'Answer as the participant, in JSON: {"reasoning": ..., "response": ...}')
            calls.append((name, [{"role": "user", "content": prompt}]))
    return calls


RULES = ("You are playing a digital version of the social deduction game Werewolf.\n"
         "GAME RULES:\n- Werewolves know each other and eliminate one player each night.\n"
         "- The Seer learns one player's role each night. The Doctor protects one player.\n"
         "- In the day, players debate and vote to exile one player.")


def werewolf_calls(rng: random.Random, rounds: int) -> list[Call]:
    transcript: list[str] = []
    calls = []
    for round_ in range(1, rounds + 1):
        for phase in ("bid", "debate", "vote"):
            for k in rng.sample(range(len(NAMES)), len(NAMES)):
                prompt = (f"{RULES}\n\nYou are {NAMES[k]}. Your role is {ROLES[k]}.\n\n"
                          f"Round {round_}, {phase} phase. " + {"bid": "How eager are you to speak, 0 to 4?",
                                                                "debate": "What do you say to the group?",
                                                                "vote": "Whom do you vote to exile?"}[phase]
                          + "\n\nTranscript so far:\n" + "\n".join(transcript) + '\nAnswer in JSON.')
                calls.append((NAMES[k], [{"role": "user", "content": prompt}]))
            transcript.append(f"{rng.choice(NAMES)} said something in round {round_} during {phase}.")
    return calls


CONCORDIA_SYSTEM = "You are a helpful storyteller. Continue the text in the voice of the character named."
FEW_SHOT = [{"role": "user", "content": "Question: What does Alice do when it rains?\nAnswer:"},
            {"role": "assistant", "content": "Alice opens her umbrella and keeps walking."},
            {"role": "user", "content": "Question: What does Bob say to the baker?\nAnswer:"},
            {"role": "assistant", "content": "Bob asks for two loaves of rye."}]


def concordia_calls(rng: random.Random, steps: int) -> list[Call]:
    memories = {name: [f"{name} woke up at {6 + k} am."] for k, name in enumerate(NAMES[:6])}
    calls = []
    for step in range(steps):
        log = f"Scene {step}: the market square at noon. " + " ".join(f"{n} is here." for n in memories)
        calls.append(("game_master", [{"role": "system", "content": CONCORDIA_SYSTEM}, *FEW_SHOT,
                                      {"role": "user", "content": f"Game master log.\n{log}\nWhat happens next?"}]))
        for name in rng.sample(list(memories), len(memories)):
            context = "\n".join(memories[name][-25:])
            calls.append((name, [{"role": "system", "content": CONCORDIA_SYSTEM}, *FEW_SHOT,
                                 {"role": "user", "content": f"{name}'s memories:\n{context}\n\n"
                                                             f"Question: What does {name} do next?\nAnswer:"}]))
            memories[name].append(f"At step {step} {name} went to the {rng.choice(['bakery', 'park', 'bank'])}.")
    return calls


SCENE = ("You are in a university classroom and it is a lecture on natural language processing.\n"
         "The professor teaches, the students ask questions when they do not understand.")


def agentverse_calls(rng: random.Random, turns: int) -> list[Call]:
    roles = {"Professor Micheal": "a knowledgeable professor in NLP",
             **{f"Student {n}": f"a student who wants to learn about {t}" for n, t in
                (("Beta", "attention"), ("Gamma", "tokenizers"), ("Delta", "evaluation"), ("Zeta", "ethics"))}}
    history: list[str] = []
    calls = []
    for turn in range(turns):
        for name in rng.sample(list(roles), len(roles)):
            prompt = (f"{SCENE}\n\nYou are {name}, {roles[name]}.\n\nHere is the chat history:\n"
                      + "\n".join(history) + f"\n\nWhat will you, {name}, say next? Keep it short.")
            calls.append((name, [{"role": "system", "content": prompt}]))
        history.append(f"[{rng.choice(list(roles))}]: a remark in turn {turn}.")
    return calls


SHAPES = {"oasis": oasis_calls, "genagents": genagents_calls, "werewolf": werewolf_calls,
          "concordia": concordia_calls, "agentverse": agentverse_calls}


def purity_and_splitting(truth: list[str], inferred: list[str | None]) -> tuple[float, float]:
    """Purity: the share of calls whose id's most common true agent is their own (an id that mixes
    agents lowers it). Splitting: the share of calls outside their true agent's most common id (an
    agent spread over several ids raises it). None counts as an id of its own per call."""
    ids = [i if i is not None else f"none-{n}" for n, i in enumerate(inferred)]
    pairs = list(zip(ids, truth))

    def majority_share(key, other) -> float:
        groups: dict[str, dict[str, int]] = {}
        for pair in pairs:
            counts = groups.setdefault(key(pair), {})
            counts[other(pair)] = counts.get(other(pair), 0) + 1
        return sum(max(c.values()) for c in groups.values()) / len(pairs)

    return majority_share(lambda p: p[0], lambda p: p[1]), 1 - majority_share(lambda p: p[1], lambda p: p[0])

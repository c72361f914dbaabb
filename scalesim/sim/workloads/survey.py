"""`survey`: generative agents of 1,000 people. Each agent has a long, stable private prefix
(its interview), and answers many independent questions, asked question-major: every agent
answers question 1, then question 2, ... with a thread pool of limited size. A step is one wave
of the pool. Hints: the exact step at which each agent is asked next (schedule)."""

import random

from scalesim.sim.workloads.text import observation, persona
from scalesim.sim.workloads.trace import AgentSpec, Call, Step, Trace, WorkloadConfig

HEADER = "Below is an interview with a study participant. Answer the survey question as they would.\n"
INTERVIEW_WORDS = 160
POOL_SIZE = 10
NOT_AGAIN = 10**6
QUESTIONS = ["How much do you trust your neighbours?", "Would you vote for the new park?",
             "How often do you read the news?", "What worries you most this year?",
             "Would you take a pay cut for a shorter week?", "Do you give to charity?"]


def generate(cfg: WorkloadConfig) -> Trace:
    rng = random.Random(cfg.seed)
    agents = [AgentSpec(f"survey-{i}", HEADER + persona(rng, i, extra_facts=4) + " Interview: " +
                        observation(rng, INTERVIEW_WORDS), history_turns=0, **cfg.agent_state(i))
              for i in range(cfg.agents)]
    waves = [agents[i:i + POOL_SIZE] for i in range(0, len(agents), POOL_SIZE)]
    order = [(q, wave) for q in range(len(QUESTIONS)) for wave in waves][: cfg.steps]
    asked = {a.agent_id: [i for i, (_, wave) in enumerate(order) if a in wave] for a in agents}
    steps = []
    for index, (question, wave) in enumerate(order):
        schedule = {a: next((s for s in when if s >= index), NOT_AGAIN) for a, when in asked.items()}
        calls = [Call(a.agent_id, QUESTIONS[question], cfg.output_tokens) for a in wave]
        steps.append(Step(index, calls, {"schedule": schedule}))
    return Trace("survey", agents, steps, max_concurrency=POOL_SIZE)

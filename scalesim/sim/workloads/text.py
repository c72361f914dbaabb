"""Seeded prompt text in the shape real frameworks send: a shared header, a private persona,
then the turn's observation. Words are drawn from small themed vocabularies, not random tokens."""

import random

NAMES = ["Isabella", "Klaus", "Maria", "John", "Eddy", "Ayesha", "Carmen", "Tom", "Jennifer", "Rajiv", "Sam",
         "Latoya", "Abigail", "Francisco", "Hailey", "Arthur", "Yuriko", "Wolfgang", "Giorgio", "Mei", "Tamara",
         "Ryan", "Adam", "Jane", "Carlos"]
JOBS = ["runs the cafe", "is a student of sociology", "paints landscapes", "is the town pharmacist",
        "studies music composition", "writes poetry", "owns the supply store", "teaches at the college",
        "is a software engineer", "is a retired professor", "tends the community garden", "is a reporter"]
TRAITS = ["curious", "friendly", "stubborn", "shy", "ambitious", "kind", "talkative", "careful", "witty", "calm"]
PLACES = ["the cafe", "the library", "the park", "the market", "the college", "the bar", "the pharmacy",
          "the town square", "home"]
TOPICS = ["the election", "the new bakery", "a research paper", "the concert", "the weather", "a painting",
          "the garden", "a local scandal", "the festival", "rent prices", "a new recipe", "the football match"]


def persona(rng: random.Random, index: int, extra_facts: int = 3) -> str:
    name = f"{NAMES[index % len(NAMES)]} {index}"
    facts = [f"{name} {rng.choice(JOBS)}.", f"{name} is {rng.choice(TRAITS)} and {rng.choice(TRAITS)}."]
    facts += [f"{name} cares about {rng.choice(TOPICS)} and often visits {rng.choice(PLACES)}."
              for _ in range(extra_facts)]
    return " ".join(facts)


def observation(rng: random.Random, words: int = 20) -> str:
    parts = []
    while sum(len(p.split()) for p in parts) < words:
        parts.append(f"At {rng.choice(PLACES)} someone mentions {rng.choice(TOPICS)}.")
    return " ".join(parts)

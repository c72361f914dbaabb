"""`make demo`: a few simulated agents share one engine and one cached town prompt.

Five agents of a Smallville-like town ask the built-in model what they do next. They share a
common system prompt (stored once in the prefix cache) and each has a private persona. The demo
prints their replies and what the cache saved.
"""

import time

from rich.console import Console
from rich.table import Table

from scalesim import LLM, SamplingParams

TOWN = ("You are a resident of the small town of Willow Creek. The town has a cafe, a library, a park, "
        "a market and a school. Answer in one short sentence, in the first person, about what you do next.")
AGENTS = {
    "isabella": "I am Isabella, I run the cafe and I am planning a Valentine's Day party.",
    "klaus": "I am Klaus, a student writing a research paper on gentrification.",
    "maria": "I am Maria, a student who loves streaming games and chatting with Klaus.",
    "john": "I am John, the pharmacist, and I like to talk about local politics.",
    "eddy": "I am Eddy, a music student composing a new piece for the school concert.",
}


def main() -> None:
    console = Console()
    console.print("[bold]ScaleSim demo[/bold]: loading smollm2-135m (converted from its GGUF file once, then cached)")
    started = time.perf_counter()
    llm = LLM("smollm2-135m", kv_cache_memory="512MiB")
    console.print(f"loaded in {time.perf_counter() - started:.1f} s")
    conversations = [[{"role": "system", "content": TOWN + " " + persona},
                      {"role": "user", "content": "It is 8 am. What do you do now?"}] for persona in AGENTS.values()]
    params = SamplingParams(max_tokens=40, temperature=0.7, top_p=0.9, seed=0)
    for hour in ("8 am", "noon"):
        for conversation in conversations:
            conversation[-1]["content"] = f"It is {hour}. What do you do now?"
        started = time.perf_counter()
        outputs = llm.chat(conversations, params, agent_ids=list(AGENTS))
        elapsed = time.perf_counter() - started
        table = Table(title=f"{hour}: {len(AGENTS)} agents in one batch, {elapsed:.1f} s")
        table.add_column("agent")
        table.add_column("reply")
        table.add_column("cached prompt tokens", justify="right")
        for agent, out in zip(AGENTS, outputs):
            table.add_row(agent, out.outputs[0].text.strip(), f"{out.num_cached_tokens}/{len(out.prompt_token_ids)}")
        console.print(table)
    stats = llm.stats()
    console.print(f"prefix cache: {stats['cached_prompt_tokens']} of {stats['prompt_tokens']} prompt tokens "
                  f"came from cached pages; {stats['kv_blocks_cached']} pages cached, "
                  f"{stats['kv_blocks_total']} in the pool")


if __name__ == "__main__":
    main()

"""`make demo`: a Smallville-style town of 40 agents on the built-in model, run three times on
the same engine — with ScaleSim's invocation-distance memory, with LRU (the same machinery with
the recency key and no prefetch), and with unbounded memory (the limit) — under the same
budgets (the `tiered` regime): the device holds a quarter of all agent state, the host a quarter, the rest goes to disk
(whose reads cost what the disk costs). Prints the comparison, two agents' actual
lines, and saves a plot."""

import sys

from rich.console import Console

from scalesim.bench.sim_bench import plot, print_table, run_sim_bench, write_json
from scalesim.sim.workloads import WorkloadConfig

DEMO_AGENTS = 40
DEMO_STEPS = 3
DEMO_OUTPUT_TOKENS = 12
PLOT_PATH = "demo.png"
JSON_PATH = "demo.json"
NOISE_FRACTION = 0.2  # single runs on the 2-core CI machine vary by about this much


def main() -> None:
    console = Console(width=200)
    console.print(f"[bold]ScaleSim demo[/bold]: town workload, {DEMO_AGENTS} agents, {DEMO_STEPS} steps, "
                  "smollm2-135m on this machine; policies ideal, scalesim, lru")
    result = run_sim_bench("town", "smollm2-135m", WorkloadConfig(agents=DEMO_AGENTS, steps=DEMO_STEPS,
                                                                   output_tokens=DEMO_OUTPUT_TOKENS))
    print_table([result], console)
    runs = {r["policy"]: r for r in result["runs"]}
    scalesim, lru, ideal = runs["scalesim"], runs["lru"], runs["ideal"]
    ratio = lru["makespan_s"] / scalesim["makespan_s"]
    verdict = ("faster than LRU" if ratio > 1 + NOISE_FRACTION else "slower than LRU" if ratio < 1 - NOISE_FRACTION
               else "at parity with LRU (inside this machine's run-to-run noise)")
    console.print(f"ScaleSim {scalesim['makespan_s']:.1f} s, LRU {lru['makespan_s']:.1f} s, unbounded memory "
                  f"{ideal['makespan_s']:.1f} s: ScaleSim is {verdict}, LRU/ScaleSim = {ratio:.2f}x; "
                  f"prefetches used/wasted {scalesim['prefetch_used']}/{scalesim['prefetch_wasted']}. One run each; "
                  f"`scalesim bench town --repeats 3` gives medians.")
    for agent, step, text in scalesim["samples"][:2]:
        console.print(f"  [cyan]{agent}[/cyan] at step {step}: {text.strip()!r}")
    write_json([result], JSON_PATH)
    plot([result], PLOT_PATH)
    console.print(f"wrote {JSON_PATH} and {PLOT_PATH}")


if __name__ == "__main__":
    sys.exit(main())

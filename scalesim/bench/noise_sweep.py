"""`scalesim bench WORKLOAD --hint-noise-sweep 0,1,2,4,inf`: how much ScaleSim depends on good hints.

The same trace runs under `scalesim` once per noise level (every hinted distance off by a
uniform random error of up to +-noise steps; `inf` withholds the hints, leaving the learned
fallback alone), with `ideal`, `oracle` (the true future) and `lru` (no hints, recency) as
reference lines, same engine and budgets. Every run of a round goes in a rotated order, and each
point is the median of its rounds, with every makespan kept; the spread of `ideal`'s rounds is
the noise floor.
"""

import math
import statistics

from scalesim.bench.provenance import provenance
from scalesim.bench.regimes import REGIMES, Regime
from scalesim.bench.sim_bench import _run_policy, policy_budgets, prepare, rotated_order
from scalesim.sim.workloads import WorkloadConfig

REFERENCES = ("ideal", "oracle", "lru")


def parse_noise_levels(text: str) -> list[float]:
    levels = [float(x) for x in text.split(",") if x.strip()]
    if not levels or any(level < 0 for level in levels):
        raise ValueError(f"--hint-noise-sweep takes non-negative numbers or inf, got {text!r}")
    return levels


def _label(noise: float) -> str:
    return f"scalesim@{noise:g}"


def _breakdown(stats: dict) -> dict:
    """Where a run's time and bytes went, in the order of its rounds: forward passes, bytes loaded
    onto the device, prefetches used and wasted, tokens recomputed."""
    return {"forward_s": stats["engine"]["forward_s"], "bytes_loaded": int(stats.get("bytes_in", 0)),
            "prefetch_used": int(stats.get("prefetch_used", 0)), "prefetch_wasted": int(stats.get("prefetch_wasted", 0)),
            "recomputed_tokens": int(stats.get("recomputed_tokens", 0))}


def run_noise_sweep(workload: str, model: str, cfg: WorkloadConfig, noise_levels: list[float],
                    regime: Regime = REGIMES["tiered"], repeats: int = 1) -> dict:
    """Every reference policy and every noise level `repeats` times in rotated rounds."""
    setup = prepare(workload, model, cfg, regime, {})
    runs = {**{p: (p, 0.0) for p in REFERENCES}, **{_label(n): ("scalesim", n) for n in noise_levels}}
    makespans: dict[str, list[float]] = {name: [] for name in runs}
    breakdowns: dict[str, list[dict]] = {name: [] for name in runs}
    for name in rotated_order(tuple(runs), repeats):
        policy, noise = runs[name]
        result, stats = _run_policy(model, policy, setup.trace, setup.folders, policy_budgets(setup, policy), noise, {})
        makespans[name].append(round(result.makespan_s, 4))
        breakdowns[name].append(_breakdown(stats))
    median = {name: statistics.median(values) for name, values in makespans.items()}
    references = {p: median[p] for p in REFERENCES}
    ideal = makespans["ideal"]
    noise_floor = round((max(ideal) - min(ideal)) / median["ideal"], 4) if repeats > 1 else None
    sweep = [{"hint_noise_steps": noise if math.isfinite(noise) else None,  # None: hints withheld
              "hints": "exact" if noise == 0 else "noisy" if math.isfinite(noise) else "withheld (learned fallback)",
              "makespan_s": median[_label(noise)], "makespans_s": makespans[_label(noise)],
              "breakdowns": breakdowns[_label(noise)]} for noise in noise_levels]
    for point in sweep:
        point["vs_ideal"] = round(point["makespan_s"] / references["ideal"], 4)
        point["vs_oracle"] = round(point["makespan_s"] / references["oracle"], 4)
        point["lru_vs_scalesim"] = round(references["lru"] / point["makespan_s"], 4)
    return {"benchmark": "hint_noise_sweep", "workload": workload, "model": model, "config": cfg.__dict__,
            "regime": regime.__dict__, "device_fraction": regime.device_fraction,
            "host_fraction": regime.host_fraction, "calls": setup.trace.num_calls, "repeats": repeats,
            "order": rotated_order(tuple(runs), repeats), "noise_floor": noise_floor,
            "reference_makespan_s": references, "reference_makespans_s": {p: makespans[p] for p in REFERENCES},
            "reference_breakdowns": {p: breakdowns[p] for p in REFERENCES},
            "sweep": sweep,
            "spread_vs_exact": round(statistics.fmean(p["makespan_s"] for p in sweep) / sweep[0]["makespan_s"], 4),
            "measured_on": provenance()}


def plot_noise_sweep(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 3.6), squeeze=False)
    for ax, result in zip(axes[0], results):
        labels = ["none (learned)" if p["hint_noise_steps"] is None else f"±{p['hint_noise_steps']:g}"
                  for p in result["sweep"]]
        ax.plot(labels, [p["makespan_s"] for p in result["sweep"]], marker="o", label="scalesim")
        for policy, style in (("ideal", "--"), ("oracle", "-."), ("lru", ":")):
            ax.axhline(result["reference_makespan_s"][policy], color="grey", linestyle=style, label=policy)
        ax.set_xlabel("hint error (steps); 'none' = no hints")
        ax.set_ylabel("makespan (s)")
        ax.set_title(f"{result['workload']}: makespan vs hint error")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_table(result: dict) -> str:
    """The README's table of one sweep: each hint level's median makespan with every round,
    against ideal, oracle and lru; then the references' rounds and the noise floor."""
    rows = ["| hints | scalesim makespan s (rounds) | vs ideal | vs oracle | lru / scalesim |", "|---|---|---|---|---|"]
    for point in result["sweep"]:
        hints = "none (learned fallback)" if point["hint_noise_steps"] is None else (
            "exact" if point["hint_noise_steps"] == 0 else f"±{point['hint_noise_steps']:g} steps")
        rounds = ", ".join(f"{x:.1f}" for x in point["makespans_s"])
        rows.append(f"| {hints} | **{point['makespan_s']:.1f}** ({rounds}) | {point['vs_ideal']:.2f}x | "
                    f"{point['vs_oracle']:.2f}x | {point['lru_vs_scalesim']:.2f}x |")
    for policy in REFERENCES:
        rounds = ", ".join(f"{x:.1f}" for x in result["reference_makespans_s"][policy])
        rows.append(f"| reference: {policy} | **{result['reference_makespan_s'][policy]:.1f}** ({rounds}) | | | |")
    floor = result["noise_floor"]
    rows.append(f"| noise floor (spread of ideal's rounds) | {'-' if floor is None else f'{floor:.0%}'} | | | |")
    return "\n".join(rows)

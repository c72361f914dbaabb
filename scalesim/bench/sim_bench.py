"""`scalesim bench WORKLOAD`: one trace, several memory policies, the same engine, in one regime.

Budgets are fractions of the total agent state (every agent's KV context at its longest, plus
its adapters or private models) so that the comparison means the same at any scale; the regime
(bench/regimes.py) says how much the device and host hold and whether there is a disk, and a
baseline that copies a system's default deployment keeps its own tiers. Every policy runs the
identical trace with greedy decoding and a fixed number of output tokens, so they do the same
work; only where state lives differs.

Measurement: with `repeats` the policies run in turn, each round in a rotated order (so neither
drift nor warm-up favours one), and each reports its median run with the min and max. The
spread of `ideal`'s repeats ((max - min) / median) is the noise floor: a ratio within it of 1
is reported as parity, never as a win or a loss.
"""

import asyncio
import json
import statistics
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scalesim.async_llm import AsyncLLM
from scalesim.bench.provenance import provenance
from scalesim.bench.regimes import REGIMES, Regime, below_device
from scalesim.memory.policies import POLICIES
from scalesim.sim.runner import InProcessTarget, RunResult, run_trace
from scalesim.sim.workloads import WORKLOADS, Trace, WorkloadConfig

DEFAULT_POLICIES = ("ideal", "scalesim", "lru")
CHAT_TEMPLATE_TOKENS_PER_TURN = 8
BENCH_ADAPTER_RANK = 8
SAMPLES_PER_RUN = 4


@dataclass
class PolicyRun:
    policy: str
    makespan_s: float
    ttft_mean_s: float
    ttft_p90_s: float
    requests: int
    tokens_out: int
    device_hit_rate: float
    device_hit_rate_per_kind: dict
    bytes_loaded: int
    stall_s: float
    recomputed_tokens: int
    prefetch_used: int
    prefetch_wasted: int
    transfer_s: float = 0.0          # seconds the transfer threads spent copying, reading, writing
    stall_request_s: float = 0.0     # the sum of every request's wait for its loads
    preemptions: int = 0
    engine_steps: int = 0            # batches run: waits and smaller batches show up as more of them
    computed_tokens: int = 0
    mean_batch_seqs: float = 0.0     # sequences per batch: a device too small for the step's state runs smaller ones
    forward_s: float = 0.0           # seconds in forward passes; makespan - forward_s - idle_s is the rest
    idle_s: float = 0.0              # seconds with requests queued and none runnable (loads, room)
    occupancy: list = field(default_factory=list)
    samples: list = field(default_factory=list)  # a few (agent, step, reply) as generated
    memory: dict = field(default_factory=dict)
    makespans_s: list = field(default_factory=list)  # every repeat's makespan; this run is the median one
    device_nbytes: int = 0
    host_nbytes: int = 0
    disk: bool = False


def _first_reply_per_agent(result: RunResult) -> list[tuple[str, int, str]]:
    seen, out = set(), []
    for call in result.calls:
        if call.agent_id not in seen:
            seen.add(call.agent_id)
            out.append((call.agent_id, call.step, call.text))
    return out


def _hit_rates(stats: dict) -> tuple[float, dict]:
    """Share of uses found on the device when the request arrived: KV in tokens (loaded from
    host or disk, or recomputed, is not a device hit), adapters and private models in requests."""
    per_kind, hits_all, total_all = {}, 0.0, 0.0
    for kind in ("kv", "adapter", "model"):
        hits = stats.get(f"hit.{kind}.device", 0)
        misses = sum(v for k, v in stats.items() if k.startswith(f"hit.{kind}.") and not k.endswith(".device"))
        misses += stats.get(f"miss.{kind}", 0)
        if hits + misses:
            per_kind[kind] = round(hits / (hits + misses), 4)
            hits_all, total_all = hits_all + hits / (hits + misses), total_all + 1
    return (round(hits_all / total_all, 4) if total_all else 1.0), per_kind


def _contexts(trace: Trace, tokenizer) -> dict[str, tuple[int, list[int]]]:
    """Per agent: its system prompt's tokens, and the tokens of each of its calls' whole context
    (system, the history window up to that call, chat-template overhead, the reply)."""
    out = {}
    for agent in trace.agents:
        system, turns, contexts = len(tokenizer.encode(agent.system)), [], []
        for call in (c for s in trace.steps for c in s.calls if c.agent_id == agent.agent_id):
            turns.append(len(tokenizer.encode(call.user)) + call.max_tokens + 2 * CHAT_TEMPLATE_TOKENS_PER_TURN)
            window = turns if agent.history_turns is None else turns[-max(agent.history_turns, 1):]
            contexts.append(system + sum(window))
        out[agent.agent_id] = (system, contexts)
    return out


def estimate_state_nbytes(contexts: dict[str, tuple[int, list[int]]], kv_bytes_per_token: int,
                          weight_nbytes: dict) -> int:
    """Every agent's KV context at its last call plus the weights it owns (each counted once)."""
    tokens = sum(calls[-1] if calls else system for system, calls in contexts.values())
    return tokens * kv_bytes_per_token + sum(weight_nbytes.values())


def ideal_device_nbytes(contexts: dict[str, tuple[int, list[int]]], kv_bytes_per_token: int, block_size: int,
                        weight_nbytes: dict) -> int:
    """A device that never has to move or drop anything on this trace: every call's whole
    context as if nothing were shared (each call adds at most its context to the prefix cache),
    two part-filled blocks per call (a new leaf and a split), every weight, and room for one
    step's stacked LoRA buffers."""
    tokens = sum(sum(calls) + 2 * block_size * len(calls) for _, calls in contexts.values())
    return tokens * kv_bytes_per_token + 2 * sum(weight_nbytes.values())


def _prepare_weights(model: str, trace: Trace) -> dict[str, str]:
    """Adapter folders per cluster (made once with peft and cached); private models per agent."""
    from scalesim.bench.adapters_bench import bench_adapters
    from scalesim.models.registry import cache_dir
    from scalesim.weights.fixtures import make_private_model

    clusters = sorted({a.adapter_cluster for a in trace.agents if a.adapter_cluster is not None})
    folders = {}
    if clusters:
        paths = bench_adapters(model, len(clusters), BENCH_ADAPTER_RANK)
        folders.update({f"cluster-{c}": str(p) for c, p in zip(clusters, paths)})
    for agent in trace.agents:
        if agent.private_model:
            folder = cache_dir() / "bench" / f"private-{model}-{agent.agent_id}"
            if not (folder / "config.json").exists():
                make_private_model(model, folder, seed=hash(agent.agent_id) % 2**31)
            folders[f"model-{agent.agent_id}"] = str(folder)
    return folders


def _warm_up(probe, adapter: str | None) -> None:
    """One short prompt and decode (with an adapter if the trace has any), so that the kernels are
    built and loaded before the first timed run instead of inside it."""
    from scalesim.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    prompt = "warm up the kernels " * 3  # past the LoRA kernel's matmul threshold
    probe.generate([prompt, "hi"], params, adapters=[adapter, adapter])


@dataclass(frozen=True)
class Budgets:
    device_nbytes: int
    host_nbytes: int
    disk: bool


def _run_policy(model: str, policy: str, trace: Trace, folders: dict[str, str], budgets: Budgets,
                hint_noise_steps: float, engine_args: dict) -> tuple[RunResult, dict]:
    with tempfile.TemporaryDirectory(prefix="scalesim-bench-") as state_dir:
        llm = AsyncLLM(model, policy=policy, device_memory=budgets.device_nbytes, host_memory=budgets.host_nbytes,
                       disk_dir=state_dir if budgets.disk else None, persist_on_exit=False, **engine_args)
        try:
            for name, folder in folders.items():
                (llm.add_adapter if name.startswith("cluster-") else llm.add_private_model)(name, folder)
            for agent in trace.agents:
                adapter = f"cluster-{agent.adapter_cluster}" if agent.adapter_cluster is not None else None
                llm.register_agent(agent.agent_id, adapter=adapter,
                                   model=f"model-{agent.agent_id}" if agent.private_model else None)
            if policy == "oracle":
                llm.set_future(trace.future())
            result = asyncio.run(run_trace(trace, InProcessTarget(llm), desc=policy, hint_noise_steps=hint_noise_steps))
            return result, {**llm.memory_stats(), "engine": llm.stats()}
        finally:
            llm.shutdown()


@dataclass
class BenchSetup:
    """A workload's trace, its weight folders, and the byte budgets its fractions come to."""

    trace: Trace
    folders: dict[str, str]
    total_nbytes: int
    regime: Regime
    device_nbytes: int
    host_nbytes: int
    ideal_nbytes: int
    kv_bytes_per_token: int
    state_sizes: dict  # what the projection needs to model this run (bench/costmodel.py, project_measured)


def prepare(workload: str, model: str, cfg: WorkloadConfig, regime: Regime, engine_args: dict) -> BenchSetup:
    from scalesim.llm import LLM

    trace = WORKLOADS[workload](cfg)
    folders = _prepare_weights(model, trace)
    probe = LLM(model, kv_cache_memory="64MiB", **engine_args)  # room for an adapter in the warm-up
    block_size = probe.engine.pool.block_size
    kv_bytes_per_token = probe.engine.pool.block_nbytes // block_size
    weight_nbytes = {}
    for name, folder in folders.items():
        (probe.add_adapter if name.startswith("cluster-") else probe.add_private_model)(name, folder)
        handle = probe.engine.weights.adapters.get(name) or probe.engine.weights.models.get(name)
        weight_nbytes[name] = handle.nbytes
    _warm_up(probe, next((n for n in folders if n.startswith("cluster-")), None))
    adapters = [n for name, n in weight_nbytes.items() if name.startswith("cluster-")]
    state_sizes = {"kv_bytes_per_token": kv_bytes_per_token, "adapter_nbytes": int(statistics.fmean(adapters or [0])),
                   "model_params": probe.engine.model_config.matmul_params,
                   "bytes_per_param": probe.engine.model.embed_tokens.weight.element_size()}
    probe.engine.shutdown()
    contexts = _contexts(trace, probe.tokenizer)
    total = estimate_state_nbytes(contexts, kv_bytes_per_token, weight_nbytes)
    ideal = ideal_device_nbytes(contexts, kv_bytes_per_token, block_size, weight_nbytes)
    return BenchSetup(trace, folders, total, regime, int(total * regime.device_fraction),
                      int(total * regime.host_fraction), ideal, kv_bytes_per_token, state_sizes)


def policy_budgets(setup: BenchSetup, policy: str) -> Budgets:
    """The tiers `policy` runs with: the regime's, except where the policy copies a deployment
    with tiers of its own (a baseline's host as a multiple of the device, no disk), and for the
    unbounded limit a device that holds everything the trace caches, with no host or disk."""
    p = POLICIES[policy]
    host, disk = below_device(p, setup.device_nbytes, setup.host_nbytes, setup.regime.disk)
    return Budgets(setup.ideal_nbytes if p.unbounded_device else setup.device_nbytes, host, disk)


def rotated_order(policies: tuple[str, ...], repeats: int) -> list[str]:
    """Every policy once per round, each round starting one policy later than the last."""
    return [policies[(r + i) % len(policies)] for r in range(repeats) for i in range(len(policies))]


def check_ideal(stats: dict) -> None:
    """The unbounded limit must never have evicted, dropped, recomputed or loaded KV: if it did,
    its device was not unbounded and it is not the limit. (Each weight is still read from its
    files once, as under every policy; without evictions it is never read twice.)"""
    moved = {k: v for k, v in stats.items() if v and (k in ("evicted", "dropped", "recomputed_tokens")
                                                      or k.startswith(("bytes_in.kv", "on_demand_loads.kv")))}
    if moved:
        raise RuntimeError(f"ideal moved state although its device was sized to hold everything: {moved}")


def verdict(ratio: float, noise_floor: float) -> str:
    """'parity' when `ratio` (baseline time over ScaleSim's) is within the noise floor of 1."""
    if abs(ratio - 1) <= noise_floor:
        return "parity"
    return "scalesim faster" if ratio > 1 else "scalesim slower"


def run_sim_bench(workload: str, model: str, cfg: WorkloadConfig, policies: tuple[str, ...] = DEFAULT_POLICIES,
                  regime: Regime = REGIMES["tiered"], hint_noise_steps: float = 0.0,
                  engine_args: dict | None = None, repeats: int = 1) -> dict:
    """Run `workload` under each policy; return the JSON-ready result (runs, ratios, verdicts).

    With `repeats` > 1 the policies run in rotated rounds (so machine noise hits each alike);
    each policy reports its median-makespan run, with every makespan in `makespans_s`."""
    engine_args = engine_args or {}
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    setup = prepare(workload, model, cfg, regime, engine_args)
    trace, folders, total = setup.trace, setup.folders, setup.total_nbytes
    attempts: dict[str, list[PolicyRun]] = {p: [] for p in policies}
    for policy in rotated_order(policies, repeats):
        budgets = policy_budgets(setup, policy)
        result, stats = _run_policy(model, policy, trace, folders, budgets, hint_noise_steps, engine_args)
        if POLICIES[policy].unbounded_device:
            check_ideal(stats)
        ttfts = sorted(c.ttft_s for c in result.calls)
        overall, per_kind = _hit_rates(stats)
        attempts[policy].append(PolicyRun(
            policy=policy, makespan_s=round(result.makespan_s, 4), ttft_mean_s=round(statistics.fmean(ttfts), 4),
            ttft_p90_s=round(ttfts[int(0.9 * (len(ttfts) - 1))], 4), requests=len(result.calls),
            tokens_out=sum(c.tokens_out for c in result.calls), device_hit_rate=overall,
            device_hit_rate_per_kind=per_kind, bytes_loaded=int(stats.get("bytes_in", 0)),
            stall_s=round(stats.get("stall_s", 0.0), 4), recomputed_tokens=int(stats.get("recomputed_tokens", 0)),
            prefetch_used=int(stats.get("prefetch_used", 0)), prefetch_wasted=int(stats.get("prefetch_wasted", 0)),
            transfer_s=round(stats.get("transfer_s", 0.0), 4), stall_request_s=round(stats.get("stall_request_s", 0.0), 4),
            preemptions=stats["engine"]["preemptions"], engine_steps=stats["engine"]["steps"],
            computed_tokens=stats["engine"]["computed_tokens"],
            mean_batch_seqs=round(stats["engine"]["scheduled_seqs"] / max(stats["engine"]["steps"], 1), 2),
            forward_s=stats["engine"]["forward_s"], idle_s=stats["engine"]["idle_s"],
            occupancy=[(round(t, 3), n) for t, n in result.occupancy],
            samples=_first_reply_per_agent(result)[:SAMPLES_PER_RUN], memory=stats,
            device_nbytes=budgets.device_nbytes, host_nbytes=budgets.host_nbytes, disk=budgets.disk))
    runs = []
    for policy, tries in attempts.items():
        median = sorted(tries, key=lambda r: r.makespan_s)[(len(tries) - 1) // 2]
        median.makespans_s = [r.makespan_s for r in tries]
        runs.append(median)
    makespan = {r.policy: r.makespan_s for r in runs}
    ideal_runs = attempts.get("ideal", [])
    noise_floor = (max(r.makespan_s for r in ideal_runs) - min(r.makespan_s for r in ideal_runs)) / makespan["ideal"] \
        if len(ideal_runs) > 1 else None
    ratios, verdicts = {}, {}
    if "scalesim" in makespan:
        if "ideal" in makespan:
            ratios["scalesim_vs_ideal"] = round(makespan["scalesim"] / makespan["ideal"], 4)
        for policy in (p for p in policies if p not in ("scalesim", "ideal")):
            name = f"{policy.replace('-', '_')}_vs_scalesim"
            ratios[name] = round(makespan[policy] / makespan["scalesim"], 4)
            if noise_floor is not None:
                verdicts[name] = verdict(ratios[name], noise_floor)
    return {"workload": workload, "model": model, "config": asdict(cfg), "calls": trace.num_calls,
            "agents": len(trace.agents), "total_state_nbytes": total, "state_sizes": setup.state_sizes,
            "regime": asdict(regime),
            "device_nbytes": setup.device_nbytes, "host_nbytes": setup.host_nbytes,
            "device_fraction": regime.device_fraction, "host_fraction": regime.host_fraction,
            "hint_noise_steps": hint_noise_steps, "repeats": repeats, "order": rotated_order(policies, repeats),
            "noise_floor": None if noise_floor is None else round(noise_floor, 4),
            "runs": [asdict(r) for r in runs], "ratios": ratios, "verdicts": verdicts,
            "measured_on": provenance()}


def run_remote(workload: str, cfg: WorkloadConfig, url: str, model: str, hint_noise_steps: float = 0.0) -> dict:
    """Drive `workload` against an OpenAI-compatible server (one run; its memory is its own)."""
    import httpx

    from scalesim.sim.runner import OpenAITarget

    root = url.rstrip("/").removesuffix("/v1")
    try:
        httpx.get(root + "/v1/models", timeout=5.0).raise_for_status()
    except (httpx.HTTPError, OSError) as exc:
        raise ValueError(f"target URL {url} does not answer /v1/models: {exc}") from exc
    trace = WORKLOADS[workload](cfg)
    result = asyncio.run(OpenAITarget(root, model).replay(trace, desc=url, hint_noise_steps=hint_noise_steps))
    ttfts = sorted(c.ttft_s for c in result.calls)
    run = {"policy": f"remote:{root}", "makespan_s": round(result.makespan_s, 4),
           "ttft_mean_s": round(statistics.fmean(ttfts), 4), "ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 4),
           "requests": len(result.calls), "tokens_out": sum(c.tokens_out for c in result.calls),
           "device_hit_rate": float("nan"), "device_hit_rate_per_kind": {}, "bytes_loaded": 0, "stall_s": 0.0,
           "recomputed_tokens": 0, "prefetch_used": 0, "prefetch_wasted": 0, "occupancy": [],
           "samples": _first_reply_per_agent(result)[:SAMPLES_PER_RUN], "memory": {}}
    return {"workload": workload, "model": model, "config": asdict(cfg), "calls": trace.num_calls,
            "agents": len(trace.agents), "device_nbytes": 0, "runs": [run], "ratios": {}}


def print_table(results: list[dict], console: Console | None = None) -> None:
    console = console or Console(width=200)
    table = Table(title="policy comparison (medians of rotated, interleaved runs on this machine)")
    for column in ("workload", "regime", "policy", "tiers", "makespan s (min-max)", "TTFT mean s", "device hit",
                   "loaded MB", "stall s", "forward/idle s", "batch", "recomputed", "prefetch used/wasted", "vs ideal", "it/scalesim", "verdict"):
        table.add_column(column, justify="right")
    for result in results:
        ideal = next((r["makespan_s"] for r in result["runs"] if r["policy"] == "ideal"), None)
        scalesim = next((r["makespan_s"] for r in result["runs"] if r["policy"] == "scalesim"), None)
        regime = result.get("regime", {}).get("name", "-")
        for run in result["runs"]:
            spread = run.get("makespans_s") or [run["makespan_s"]]
            tiers = "device" + (" + host" if run.get("host_nbytes") else "") + (" + disk" if run.get("disk") else "")
            name = f"{run['policy'].replace('-', '_')}_vs_scalesim"
            table.add_row(result["workload"], regime, run["policy"], tiers,
                          f"{run['makespan_s']:.2f} ({min(spread):.2f}-{max(spread):.2f})", f"{run['ttft_mean_s']:.3f}",
                          f"{run['device_hit_rate']:.2f}", f"{run['bytes_loaded'] / 2**20:.1f}", f"{run['stall_s']:.2f}",
                          f"{run.get('forward_s', 0):.1f}/{run.get('idle_s', 0):.1f}", f"{run.get('mean_batch_seqs', 0):.1f}",
                          str(run["recomputed_tokens"]), f"{run['prefetch_used']}/{run['prefetch_wasted']}",
                          f"{run['makespan_s'] / ideal:.2f}x" if ideal else "-",
                          f"{run['makespan_s'] / scalesim:.2f}x" if scalesim and run["policy"] != "scalesim" else "",
                          result.get("verdicts", {}).get(name, ""))
    console.print(table)
    for result in results:
        floor = result.get("noise_floor")
        console.print(f"{result['workload']}: noise floor (spread of ideal's {result.get('repeats', 1)} runs) "
                      + (f"{floor:.1%}: a ratio within it of 1 is parity" if floor is not None else
                         "unknown with one run each: no verdicts; use --repeats 3"))


def markdown_tables(results: list[dict]) -> str:
    """The README's two tables of a baseline comparison, with the policies each result ran (ideal
    and scalesim first, then every baseline in the order run): makespans with every round and the
    verdicts, then the breakdown (recomputed tokens and adapter slots of every policy but ideal)."""
    policies = [r["policy"] for r in results[0]["runs"]]
    baselines = [p for p in policies if p not in ("ideal", "scalesim")]
    policies = ["ideal", "scalesim", *baselines]
    others = policies[1:]
    head = ["| workload | " + " | ".join(f"{p} s" for p in policies) + " | scalesim / ideal | "
            + " | ".join(f"{p} / scalesim" for p in baselines) + " | noise floor |",
            "|" + "---|" * (len(policies) + len(baselines) + 3)]
    parts = ["| workload | batch " + " / ".join(policies) + " | forward s (same order) | device hit "
             + " / ".join(others) + " | stall s (same) | recomputed tokens (same) | adapter slots (same) |",
             "|---|---|---|---|---|---|---|"]
    for result in results:
        runs = {r["policy"]: r for r in result["runs"]}
        scalesim = runs["scalesim"]["makespan_s"]
        cells = [f"**{runs[p]['makespan_s']:.1f}** ({', '.join(f'{x:.1f}' for x in runs[p]['makespans_s'])})"
                 for p in policies]
        ratios = [f"{runs[p]['makespan_s'] / scalesim:.2f}x ({result['verdicts'].get(p.replace('-', '_') + '_vs_scalesim', '')})"
                  for p in baselines]
        head.append(f"| {result['workload']} | " + " | ".join(cells) + f" | {scalesim / runs['ideal']['makespan_s']:.2f}x | "
                    + " | ".join(ratios) + f" | {result['noise_floor']:.0%} |")
        parts.append(f"| {result['workload']} | " + " / ".join(f"{runs[p]['mean_batch_seqs']:.1f}" for p in policies)
                     + " | " + " / ".join(f"{runs[p]['forward_s']:.1f}" for p in policies)
                     + " | " + " / ".join(f"{runs[p]['device_hit_rate']:.2f}" for p in others)
                     + " | " + " / ".join(f"{runs[p]['stall_s']:.1f}" for p in others)
                     + " | " + " / ".join(f"{runs[p]['recomputed_tokens']:,}" for p in others)
                     + " | " + " / ".join(str(runs[p]["memory"].get("adapter_slots", "-")) for p in others) + " |")
    return "\n".join(head) + "\n\n" + "\n".join(parts)


def plot(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(11, 3.2 * len(results)), squeeze=False)
    for row, result in zip(axes, results):
        policies = [r["policy"] for r in result["runs"]]
        row[0].bar(policies, [r["makespan_s"] for r in result["runs"]], color="tab:blue")
        row[0].set_ylabel("makespan (s)")
        row[0].set_title(f"{result['workload']}: makespan per policy")
        for run in result["runs"]:
            if run["occupancy"]:
                t, used = zip(*run["occupancy"])
                row[1].plot(t, [u / 2**20 for u in used], marker=".", label=run["policy"])
        row[1].axhline(result["device_nbytes"] / 2**20, color="grey", linestyle="--", label="device budget")
        row[1].set_xlabel("seconds")
        row[1].set_ylabel("device MiB used")
        row[1].set_title("device memory occupancy (end of each step)")
        row[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(results: list[dict], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2) + "\n")


__all__ = ["run_sim_bench", "print_table", "plot", "write_json", "DEFAULT_POLICIES", "POLICIES"]

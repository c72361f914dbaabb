"""`scalesim bench WORKLOAD`: one trace, several memory policies, the same engine and budgets.

Budgets are fractions of the total agent state (every agent's KV context at its longest, plus
its adapters or private models) so that the comparison means the same at any scale. Every
policy runs the identical trace with greedy decoding and a fixed number of output tokens, so
they do the same work; only where state lives differs.
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
    occupancy: list = field(default_factory=list)
    samples: list = field(default_factory=list)  # a few (agent, step, reply) as generated
    memory: dict = field(default_factory=dict)
    makespans_s: list = field(default_factory=list)  # every repeat's makespan; this run is the median one


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


def estimate_state_nbytes(trace: Trace, tokenizer, kv_bytes_per_token: int, weight_nbytes: dict) -> int:
    """Every agent's KV context at its longest plus the weights it owns (each counted once)."""
    total = 0
    for agent in trace.agents:
        turns = [len(tokenizer.encode(c.user)) + c.max_tokens + 2 * CHAT_TEMPLATE_TOKENS_PER_TURN
                 for s in trace.steps for c in s.calls if c.agent_id == agent.agent_id]
        window = turns if agent.history_turns is None else turns[-max(agent.history_turns, 1):]
        total += (len(tokenizer.encode(agent.system)) + sum(window)) * kv_bytes_per_token
    return total + sum(weight_nbytes.values())


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


def _run_policy(model: str, policy: str, trace: Trace, folders: dict[str, str], device_nbytes: int,
                host_nbytes: int, hint_noise_steps: float, engine_args: dict) -> tuple[RunResult, dict]:
    with tempfile.TemporaryDirectory(prefix="scalesim-bench-") as state_dir:
        llm = AsyncLLM(model, policy=policy, device_memory=device_nbytes, host_memory=host_nbytes,
                       disk_dir=state_dir, persist_on_exit=False, **engine_args)
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
    device_nbytes: int
    host_nbytes: int


def prepare(workload: str, model: str, cfg: WorkloadConfig, device_fraction: float, host_fraction: float,
            engine_args: dict) -> BenchSetup:
    from scalesim.llm import LLM

    trace = WORKLOADS[workload](cfg)
    folders = _prepare_weights(model, trace)
    probe = LLM(model, kv_cache_memory="1MiB", **engine_args)
    kv_bytes_per_token = probe.engine.pool.block_nbytes // probe.engine.pool.block_size
    weight_nbytes = {}
    for name, folder in folders.items():
        (probe.add_adapter if name.startswith("cluster-") else probe.add_private_model)(name, folder)
        handle = probe.engine.weights.adapters.get(name) or probe.engine.weights.models.get(name)
        weight_nbytes[name] = handle.nbytes
    probe.engine.shutdown()
    total = estimate_state_nbytes(trace, probe.tokenizer, kv_bytes_per_token, weight_nbytes)
    return BenchSetup(trace, folders, total, int(total * device_fraction), int(total * host_fraction))


def policy_budgets(setup: BenchSetup, policy: str) -> tuple[int, int]:
    """(device, host) bytes for `policy`: the fractions' budgets, or for the unbounded limit a
    device that holds every agent's state with room to spare and no host tier."""
    if POLICIES[policy].unbounded_device:
        return 2 * setup.total_nbytes, 0
    return setup.device_nbytes, setup.host_nbytes


def run_sim_bench(workload: str, model: str, cfg: WorkloadConfig, policies: tuple[str, ...] = DEFAULT_POLICIES,
                  device_fraction: float = 0.25, host_fraction: float = 0.5, hint_noise_steps: float = 0.0,
                  engine_args: dict | None = None, repeats: int = 1) -> dict:
    """Run `workload` under each policy; return the JSON-ready result (runs and ratios).

    With `repeats` > 1 the policies run in turn that many times (so machine noise hits each alike);
    each policy reports its median-makespan run, with every makespan in `makespans_s`."""
    engine_args = engine_args or {}
    setup = prepare(workload, model, cfg, device_fraction, host_fraction, engine_args)
    trace, folders, total = setup.trace, setup.folders, setup.total_nbytes
    device_nbytes, host_nbytes = setup.device_nbytes, setup.host_nbytes
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    attempts: dict[str, list[PolicyRun]] = {p: [] for p in policies}
    for policy in [p for _ in range(repeats) for p in policies]:
        result, stats = _run_policy(model, policy, trace, folders, *policy_budgets(setup, policy), hint_noise_steps,
                                    engine_args)
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
            occupancy=[(round(t, 3), n) for t, n in result.occupancy],
            samples=_first_reply_per_agent(result)[:SAMPLES_PER_RUN], memory=stats))
    runs = []
    for policy, tries in attempts.items():
        median = sorted(tries, key=lambda r: r.makespan_s)[(len(tries) - 1) // 2]
        median.makespans_s = [r.makespan_s for r in tries]
        runs.append(median)
    makespan = {r.policy: r.makespan_s for r in runs}
    ratios = {}
    if "scalesim" in makespan and "ideal" in makespan:
        ratios["scalesim_vs_ideal"] = round(makespan["scalesim"] / makespan["ideal"], 4)
    if "scalesim" in makespan and "lru" in makespan:
        ratios["lru_vs_scalesim"] = round(makespan["lru"] / makespan["scalesim"], 4)
    return {"workload": workload, "model": model, "config": asdict(cfg), "calls": trace.num_calls,
            "agents": len(trace.agents), "total_state_nbytes": total, "device_nbytes": device_nbytes,
            "host_nbytes": host_nbytes, "device_fraction": device_fraction, "host_fraction": host_fraction,
            "hint_noise_steps": hint_noise_steps, "repeats": repeats, "runs": [asdict(r) for r in runs],
            "ratios": ratios}


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
    result = asyncio.run(run_trace(trace, OpenAITarget(root, model), desc=url, hint_noise_steps=hint_noise_steps))
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
    table = Table(title="policy comparison (ratios from one run on this machine)")
    for column in ("workload", "policy", "makespan s", "TTFT mean s", "TTFT p90 s", "device hit", "loaded MB",
                   "stall s", "recomputed", "prefetch used/wasted", "vs ideal", "lru/scalesim"):
        table.add_column(column, justify="right")
    for result in results:
        ideal = next((r["makespan_s"] for r in result["runs"] if r["policy"] == "ideal"), None)
        for run in result["runs"]:
            table.add_row(result["workload"], run["policy"], f"{run['makespan_s']:.2f}", f"{run['ttft_mean_s']:.3f}",
                          f"{run['ttft_p90_s']:.3f}", f"{run['device_hit_rate']:.2f}",
                          f"{run['bytes_loaded'] / 2**20:.1f}", f"{run['stall_s']:.2f}", str(run["recomputed_tokens"]),
                          f"{run['prefetch_used']}/{run['prefetch_wasted']}",
                          f"{run['makespan_s'] / ideal:.2f}x" if ideal else "-",
                          f"{result['ratios'].get('lru_vs_scalesim', float('nan')):.2f}x" if run["policy"] == "scalesim" else "")
    console.print(table)


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

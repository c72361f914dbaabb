"""`scalesim microbench http`: the same trace in-process and through `scalesim serve`, one machine.

Both runs get a fresh engine with the same policy and budgets. The HTTP run starts `scalesim
serve` as its own process (as a real deployment runs), registers the agents with POST
/v1/agents, and drives the trace with the official openai client (agent id in extra_body,
hints to /v1/hints). Runs alternate so that machine noise hits both; the ratio of median
makespans is what the HTTP path costs.
"""

import asyncio
import statistics
import subprocess
import sys
import tempfile

import httpx

from scalesim.bench.regimes import resolve_regime
from scalesim.bench.sim_bench import _run_policy, policy_budgets, prepare
from scalesim.server.background import free_port, wait_healthy
from scalesim.sim.runner import OpenAITarget
from scalesim.sim.workloads import Trace, WorkloadConfig

SERVER_START_TIMEOUT_S = 180.0


def _serve(model: str, policy: str, device_nbytes: int, host_nbytes: int, folders: dict[str, str],
           state_dir: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "scalesim.cli", "serve", model, "--port", str(port), "--policy", policy,
               "--device-memory", str(device_nbytes), "--host-memory", str(host_nbytes), "--disk-dir", state_dir,
               "--no-persist-on-exit"]
    adapters = [f"{n}={f}" for n, f in folders.items() if n.startswith("cluster-")]
    models = [f"{n}={f}" for n, f in folders.items() if n.startswith("model-")]
    command += (["--lora-modules", *adapters] if adapters else []) + (["--private-models", *models] if models else [])
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, SERVER_START_TIMEOUT_S, server)
    except RuntimeError:
        server.kill()
        raise
    return server, url


def _run_over_http(model: str, policy: str, trace: Trace, folders: dict[str, str], device_nbytes: int,
                   host_nbytes: int) -> float:
    with tempfile.TemporaryDirectory(prefix="scalesim-http-bench-") as state_dir:
        server, url = _serve(model, policy, device_nbytes, host_nbytes, folders, state_dir)
        try:
            for agent in trace.agents:
                body = {"id": agent.agent_id}
                if agent.adapter_cluster is not None:
                    body["adapter"] = f"cluster-{agent.adapter_cluster}"
                if agent.private_model:
                    body["model"] = f"model-{agent.agent_id}"
                httpx.post(url + "/v1/agents", json=body, timeout=60).raise_for_status()
            result = asyncio.run(OpenAITarget(url, model).replay(trace, desc=f"{policy} over http"))
            return result.makespan_s
        finally:
            server.terminate()
            server.wait(timeout=30)


def run_http_bench(workload: str, model: str, cfg: WorkloadConfig, policy: str = "scalesim", rounds: int = 2,
                   device_fraction: float = 0.25, host_fraction: float = 0.5) -> dict:
    if policy == "oracle":
        raise ValueError("the oracle policy needs the true future, which only the in-process run can be given")
    setup = prepare(workload, model, cfg, resolve_regime("tiered", device_fraction, host_fraction), {})
    makespans: dict[str, list[float]] = {"inprocess": [], "http": []}
    for _ in range(rounds):
        result, _ = _run_policy(model, policy, setup.trace, setup.folders, policy_budgets(setup, policy), 0.0, {})
        makespans["inprocess"].append(round(result.makespan_s, 4))
        makespans["http"].append(round(_run_over_http(model, policy, setup.trace, setup.folders,
                                                      setup.device_nbytes, setup.host_nbytes), 4))
    median = {t: statistics.median(v) for t, v in makespans.items()}
    return {"benchmark": "http_vs_inprocess", "workload": workload, "model": model, "policy": policy,
            "config": cfg.__dict__, "calls": setup.trace.num_calls, "device_nbytes": setup.device_nbytes,
            "host_nbytes": setup.host_nbytes, "makespan_s": makespans, "median_makespan_s": median,
            "http_vs_inprocess": round(median["http"] / median["inprocess"], 4)}

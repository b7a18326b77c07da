# Fresh machine to working setup: a virtualenv with torch and dr-gen (editable) plus dev tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision come first so pip does not pull a different build for them.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# setuptools reports how it made the editable install as a warning, which pip shows even with
# --quiet; it is information, not a problem, so that one message is filtered out (pip's own
# warnings and every error still show).
EDITABLE_INSTALL := PYTHONWARNINGS='ignore:Editable installation' $(BIN)/python -m pip install --quiet -e
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup browser demo test mutations bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(EDITABLE_INSTALL) '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/dr-gen sample-data sample_data/quickstart
	$(BIN)/dr-gen run jobs/quickstart.yaml
	$(BIN)/dr-gen inspect out/quickstart

# Headless Chromium renders the HTML report in tests/tools/test_report_html.py. Installed from Debian
# packages when missing and apt-get can run; without it that test is skipped, saying why.
browser:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
	    || command -v google-chrome >/dev/null 2>&1; then true; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
	    || echo "could not install chromium: the HTML report test will be skipped"; \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium || echo "could not install chromium: the HTML report test will be skipped"; \
	else echo "no chromium and no apt-get as root: the HTML report test will be skipped"; fi

test: setup browser
	$(BIN)/python -m pytest -q tests

# Each named source edit of tests/mutations.py, applied to a temporary copy, must make its tests fail.
mutations: setup
	$(BIN)/python tests/mutations.py

bench: setup
	$(BIN)/python bench/bench_pipeline.py

clean:
	rm -rf out sample_data .pytest_cache

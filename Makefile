# Fresh machine to working setup: a virtualenv with torch and dr-gen (editable) plus dev tools.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch/torchvision come first so pip does not pull a different build for them.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/dr-gen sample-data sample_data/quickstart
	$(BIN)/dr-gen run jobs/quickstart.yaml
	$(BIN)/dr-gen inspect out/quickstart

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/python bench/bench_pipeline.py

clean:
	rm -rf out sample_data .pytest_cache

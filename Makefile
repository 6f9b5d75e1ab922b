# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= $(or $(WUDAO_HOME),.wudao)/demo-data

.PHONY: venv demo test test-fast stack-down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch 2.14.1 / torchvision 0.29.1 come from the machine's local wheel store (see README).
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Start the local stack, make demo data, run one lifelong cycle through Prefect, print the MLflow/Prefect URLs.
demo: $(STAMP)
	$(BIN)/wudao stack up
	$(BIN)/wudao demo-data $(DEMO)
	$(BIN)/wudao cycle $(DEMO)/corpus/slice-01 --kg $(DEMO)/kg

# The whole suite, end-to-end tests included (real SeaweedFS, MLflow and Prefect servers on loopback).
test: $(STAMP)
	$(BIN)/python -m pytest -q

# Everything but the end-to-end cycle tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

stack-down:
	$(BIN)/wudao stack down

clean: stack-down
	rm -rf .wudao

# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= $(or $(WUDAO_HOME),.wudao)/demo-data

.PHONY: venv demo lint test test-fast stack-down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch 2.14.1 / torchvision 0.29.1 come from the machine's local wheel store (see README).
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Start the local stack, make demo data, serve the flows (lifelong-cycle nightly at 02:00 UTC), trigger one cycle
# through the Prefect API and print the MLflow and Prefect URLs. `make stack-down` stops everything.
DEMO_ABS = $(abspath $(DEMO))
# The demo model also learns to draw (the first slice holds scenes) and every cycle measures FID on the demo
# captions, with random TEST-ONLY Inception weights (the output says so; see README for real MS-COCO).
# 2200 steps with 32 % image steps: ~1500 text steps of 64 tokens (what memorising the slice's facts needs) and
# ~700 image steps of 96 (what drawing the caption's colours needs); about 6-7 minutes of training on 2 cores.
DEMO_ENV = WUDAO_EVAL__KG_URI=$(DEMO_ABS)/kg WUDAO_EVAL__FID_COCO_URI=$(DEMO_ABS)/coco \
           WUDAO_TRAIN__IMAGE_RATIO=0.32 WUDAO_TRAIN__SEQ_LEN=64 WUDAO_TRAIN__IMAGE_SEQ_LEN=96 \
           WUDAO_TRAIN__STEPS=2200 \
           WUDAO_EVAL__FID_WEIGHTS_URI=$(DEMO_ABS)/fid/inception-random-TEST-ONLY.pth WUDAO_EVAL__FID_N=48
demo: $(STAMP)
	$(BIN)/wudao stack up
	$(BIN)/wudao demo-data $(DEMO)
	$(DEMO_ENV) $(BIN)/wudao deploy --detach --cron "0 2 * * *" --source $(DEMO_ABS)/corpus/slice-01
	$(BIN)/wudao trigger lifelong-cycle --param source=$(DEMO_ABS)/corpus/slice-01 --wait

# Format and lint (config in pyproject.toml); `ruff format .` fixes the formatting.
lint: $(STAMP)
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .

# Lint, then the whole suite, end-to-end tests included (real object store, MLflow and Prefect servers on loopback).
test: lint
	$(BIN)/python -m pytest -q

# Everything but the end-to-end cycle tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

stack-down:
	$(BIN)/wudao stack down

clean: stack-down
	rm -rf .wudao

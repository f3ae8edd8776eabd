# Two commands set everything up on a fresh machine:
#   make demo   — venv + install, then train a tiny model with DelTA vs DAPO on CPU (metrics + pictures)
#   make test   — venv + install, then the whole CPU test suite
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
CONSTRAINTS := $(VENV)/constraints.txt
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast lint bench slurm-up slurm-down cluster-up cluster-down clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	echo "torch==$(TORCH_VERSION)" > $(CONSTRAINTS)
	$(BIN)/pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[dev,slurm]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python -m pipelines.tiny_arith_cpu --out $(DEMO_DIR)

# The local Slurm cluster and the two-node namespace cluster (slurm/local/cluster2.sh) back the
# slurm- and cluster-marked tests. Without them those tests skip — except under CI=true, where a
# failed setup fails `make test` here (and the tests fail rather than skip). The two-node cluster is
# always torn down afterwards.
test: install
	@bash slurm/local/setup.sh || { [ "$$CI" = true ] && echo "CI: local Slurm setup failed" && exit 1; \
	  echo "local Slurm unavailable: slurm-marked tests will skip"; }
	@trap 'bash slurm/local/cluster2.sh down' EXIT; \
	bash slurm/local/cluster2.sh up || { [ "$$CI" = true ] && echo "CI: two-node cluster setup failed" && exit 1; \
	  echo "two-node cluster unavailable: cluster-marked tests will skip"; }; \
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow and not dist and not slurm and not cluster"

lint: install
	$(BIN)/ruff check delta_megatron pipelines launchers tests bench

bench: install
	$(BIN)/python bench/credit_overhead.py
	$(BIN)/python bench/actor_step.py
	$(BIN)/python bench/weight_sync.py
	$(BIN)/python bench/sync_memory.py

slurm-up:
	bash slurm/local/setup.sh

slurm-down:
	bash slurm/local/teardown.sh

cluster-up:
	bash slurm/local/cluster2.sh up

cluster-down:
	bash slurm/local/cluster2.sh down

clean:
	rm -rf $(VENV) runs .pytest_cache

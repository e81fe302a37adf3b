# msdet: EfficientDet-D0 and NanoDet-Plus-m with MindSpore, driven by DVC.
# `make repro` sets everything up and runs the pipeline; `make test` sets up and runs the tests.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# DVC runs stage commands as plain `python ...`: make it the venv's (also inside dvc exp temp copies)
export PATH := $(abspath $(VENV))/bin:$(PATH)
export VIRTUAL_ENV := $(abspath $(VENV))
DVC    := $(VENV)/bin/dvc
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
MODEL  ?= nanodet
WORKERS ?= 8
PARAMS ?= params.yaml
# multi-node (train-8p): NODES hosts, this one NODE_RANK, node 0 reachable at MASTER_ADDR:MASTER_PORT
NODES ?=
NODE_RANK ?= 0
MASTER_ADDR ?= 127.0.0.1
MASTER_PORT ?= 8118
CLUSTER_ARGS := $(if $(NODES),--nodes $(NODES) --node-rank $(NODE_RANK) --master-addr $(MASTER_ADDR) --master-port $(MASTER_PORT))
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv lint deps repro test test-fast test-long clean model-summary train-8p sweep coco bench bench-full dag

help:  ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	$(PY) -m pip install --disable-pip-version-check -q --no-deps -e .
	touch $(STAMP)

# mindcv (MindSpore's model zoo, pure Python) for the tests that load its own models; --no-deps because
# its declared requirements would pull in another stack
$(TEST_STAMP): $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q --no-deps mindcv==0.3.0
	touch $(TEST_STAMP)

venv: $(STAMP)  ## create .venv with the pinned stack and msdet installed (editable)

lint: $(STAMP)  ## ruff: pyflakes, pycodestyle, isort, bugbear, pyupgrade (config in pyproject.toml)
	$(VENV)/bin/ruff check --no-cache .

deps: $(STAMP)  ## rewrite each stage's code deps in dvc.yaml to the files its command imports
	$(PY) -m msdet.devtools.stage_deps --write

repro: $(STAMP)  ## run the whole DVC pipeline on params.yaml (embedded data set by default)
	$(DVC) repro

test: $(TEST_STAMP)  ## run the test suite (CI: everything but the tests marked long)
	$(PY) -m pytest -q -m "not long" $(PYTEST_ARGS) tests

test-fast: $(TEST_STAMP)  ## the quick part: no whole-detector, end-to-end or long tests
	$(PY) -m pytest -q -m "not detector and not slow and not long" $(PYTEST_ARGS) tests

test-long: $(TEST_STAMP)  ## only the long tests (msrun hosts, kill/resume, export grid, live e2e, profile)
	$(PY) -m pytest -q -m long $(PYTEST_ARGS) tests

dag: $(STAMP)  ## print the stage graph
	$(DVC) dag

model-summary: $(STAMP)  ## parameter counts and GFLOPs of both models at the COCO setting, as JSON
	$(PY) -m stages.model_summary

train-8p: $(STAMP)  ## data-parallel training with msrun (MODEL=d0|nanodet WORKERS=8 [NODES= NODE_RANK= MASTER_ADDR=])
	$(PY) -m stages.train --model $(MODEL) --workers $(WORKERS) --params $(PARAMS) $(CLUSTER_ARGS)
	$(if $(filter-out 0,$(NODE_RANK)),@echo "node $(NODE_RANK): outputs are written and committed on node 0",$(DVC) commit -f train_$(MODEL))

SWEEP ?= -S 'nanodet.train.lr=0.001,0.002' -S 'eval.score_threshold=0.05,0.3'

sweep: $(STAMP)  ## queue a small grid with dvc exp (SWEEP=...), run it in temp copies, show the table
	$(DVC) exp run --queue $(SWEEP)
	$(DVC) exp run --run-all --jobs 1
	$(DVC) exp show --only-changed --drop 'per_class_AP.*|.*seconds|.*per_s|AR.*|APs|APm|APl' 

coco: $(STAMP)  ## the MindSpore model zoo READMEs' setting: COCO 2017, Ascend, 8 devices (see params_coco.yaml)
	$(DVC) exp run $$($(PY) -m stages.coco_overrides params_coco.yaml)

bench: $(STAMP)  ## speed and memory benchmarks -> metrics/bench.json
	$(PY) -m stages.bench

bench-full: $(STAMP)  ## time the whole default dvc repro in a clean copy (~15 min) -> metrics/bench_full.json
	$(PY) -m stages.bench --full --only pipeline --out metrics/bench_full.json

clean:  ## remove what the pipeline and tools generated; files git tracks (committed metrics, plots) stay
	git clean -fdxq -- data models plots logs bench_out kernel_meta somas_meta .pytest_cache
	rm -rf rank_*
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +

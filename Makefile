# spine-d2: `make demo` (train + evaluate on the built-in data) and `make test` each work alone
# on a fresh machine: both set up .venv first when it is missing or out of date.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The tested torch pair (a CUDA build that also runs on the CPU). Override for another CUDA.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# DiffDRR renders the built-in dataset; its declared extras (pyvista[all]...) are not needed.
DIFFDRR_SPEC ?= diffdrr==0.6.1
CONFIG ?= configs/spine_mask_rcnn_R_18_FPN_scratch_gn_cpu.yaml
OUTPUT_DIR ?= $(shell sed -n 's/^OUTPUT_DIR: *"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' $(CONFIG) | tail -1)
PYTEST_ARGS ?= -q -n 2 --durations=10
export DETECTRON2_DATASETS ?= datasets

.PHONY: install test demo data data-parts train eval export enhance bench lint clean-venv

$(VENV)/.installed: setup.py tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(TORCH_SPEC)
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install --no-deps $(DIFFDRR_SPEC)
	$(PY) -m pip install -e '.[dev,drr]'
	touch $@

install: $(VENV)/.installed  ## create .venv with torch, detectron2 and spine-d2 (idempotent)

test: $(VENV)/.installed  ## run the test suite (exit 0 also when no tests are collected)
	@$(PY) -m pytest $(PYTEST_ARGS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests were collected"; exit 0; fi; exit $$rc

data: $(VENV)/.installed  ## generate the built-in DRR dataset under $DETECTRON2_DATASETS/spine_drr
	$(PY) datasets/prepare_spine_drr.py --preview $(DATA_ARGS)

data-parts: $(VENV)/.installed  ## the same scans labelled with the paper's four part classes
	$(PY) datasets/prepare_spine_drr.py --taxonomy parts --preview $(DATA_ARGS)

train: $(VENV)/.installed  ## train $(CONFIG) (resumes from its last checkpoint)
	$(PY) tools/train_net.py --config-file $(CONFIG) --resume

eval: $(VENV)/.installed  ## evaluate the newest model of $(CONFIG) on its test split
	@test -f $(OUTPUT_DIR)/model_final.pth || { echo "No trained model at $(OUTPUT_DIR)/model_final.pth: run 'make train' (or 'make demo') first."; exit 1; }
	$(PY) tools/train_net.py --config-file $(CONFIG) --eval-only MODEL.WEIGHTS $(OUTPUT_DIR)/model_final.pth
	@echo "Results: $(OUTPUT_DIR)/inference/eval_results.json"

EXPORT_INPUT ?= $(DETECTRON2_DATASETS)/spine_drr/images/test
EXPORT_OUTPUT ?= $(OUTPUT_DIR)/zoi_export
export: $(VENV)/.installed  ## export ZOIs of EXPORT_INPUT with the newest model of $(CONFIG)
	@test -f $(OUTPUT_DIR)/model_final.pth || { echo "No trained model at $(OUTPUT_DIR)/model_final.pth: run 'make train' (or 'make demo') first."; exit 1; }
	$(PY) tools/export_zoi.py --config-file $(CONFIG) --input $(EXPORT_INPUT) --output $(EXPORT_OUTPUT) MODEL.WEIGHTS $(OUTPUT_DIR)/model_final.pth

ENHANCE_PAIRS ?= $(DETECTRON2_DATASETS)/spine_drr/pairs.json
ENHANCE_MANIFEST ?= $(OUTPUT_DIR)/zoi_export/manifest.jsonl
ENHANCE_OUTPUT ?= $(OUTPUT_DIR)/enhanced
enhance: $(VENV)/.installed  ## enhance every low-dose scan of ENHANCE_PAIRS with its high-dose pair (needs 'make export')
	@test -f $(ENHANCE_MANIFEST) || { echo "No export manifest at $(ENHANCE_MANIFEST): run 'make export' first."; exit 1; }
	$(PY) tools/enhance_scan.py --pairs $(ENHANCE_PAIRS) --out $(ENHANCE_OUTPUT) --low-manifest $(ENHANCE_MANIFEST) --high-manifest $(ENHANCE_MANIFEST)

BENCH_ARGS ?=
bench: $(VENV)/.installed  ## run every benchmarks/bench_*.py (each prints and saves one JSON line)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b $(BENCH_ARGS) || exit 1; done

demo: $(VENV)/.installed  ## train + evaluate the CPU config on the built-in data
	@test -f $(DETECTRON2_DATASETS)/spine_drr/train.json || { echo "The built-in dataset is missing under $(DETECTRON2_DATASETS)/spine_drr: run 'make data' first."; exit 1; }
	$(MAKE) train eval

lint: $(VENV)/.installed
	$(PY) -m black --line-length 100 --check spine_d2 tools tests datasets benchmarks setup.py
	$(PY) -m isort --profile black --line-length 100 --check-only spine_d2 tools tests datasets benchmarks setup.py

clean-venv:
	rm -rf $(VENV)

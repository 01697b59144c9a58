# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test fuzz lint bench clean parity

$(STAMP): pyproject.toml requirements-ci.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-ci.txt
	$(BIN)/pip install -q -c requirements-ci.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/contextpatch reproduce --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -x -p no:cacheprovider

# Random search for the property tests (tests/conftest.py: the "fuzz" hypothesis profile; `make test` is derandomized).
fuzz: $(STAMP)
	HYPOTHESIS_PROFILE=fuzz $(BIN)/python -m pytest -x -p no:cacheprovider tests/test_theory.py tests/test_blocks.py \
		tests/test_engine.py -k "token_patch or property"

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

parity: $(STAMP)
	$(BIN)/python benchmarks/parity_table.py --readme

clean:
	rm -rf $(VENV) runs

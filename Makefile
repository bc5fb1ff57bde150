# Two commands on a fresh machine (Python 3.11 + Java 17): `make demo` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
UV_VERSION := 0.13.9
BIN    := $(VENV)/bin
IMAGE  ?= localhost/gaia-flows:dev

.PHONY: install demo test test-slow lint format image screenshots clean

install: $(VENV)/.installed

# --compile-bytecode: with PYTHONDONTWRITEBYTECODE set (as on CI) every Dagster run, Spark
# Python worker and webserver would otherwise recompile pandas/dagster/pyspark on each start.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "uv==$(UV_VERSION)"
	$(BIN)/uv pip install --quiet --compile-bytecode --python $(BIN)/python --constraint constraints.txt -e ".[test]"
	$(BIN)/python -c "import gaia_flows.definitions"  # a broken install (e.g. a full disk) fails here, unstamped
	touch $@

demo: install
	$(BIN)/gaia-flows demo

test: install
	$(BIN)/pytest

test-slow: install
	$(BIN)/pytest -m slow

# The checks CI runs before the tests (settings in pyproject.toml: [tool.ruff], [tool.mypy]).
lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Rewrite the tree the way `make lint` wants it.
format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The container image (deployments/Dockerfile) with podman, on a debootstrap'ed bookworm base
# that is built once per machine; Python packages come from the uv cache `install` filled.
image: install
	deployments/podman/build-image.sh $(IMAGE)

# docs/screenshots/: the UI journeys of tests/ui/ clicked through on a fresh state folder with
# Debian's Chromium, one PNG per step (the README shows two). Not part of `make test`.
screenshots: install
	$(BIN)/python scripts/screenshots.py

clean:
	rm -rf $(VENV) .gaia

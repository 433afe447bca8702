# dsv4c: `make demo` sets up and runs the main job; `make test` sets up and runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
ART ?= artifacts/mini

.PHONY: setup demo test test-fast clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch 2.13 when the machine has it; any torch >= 2.11 otherwise.
	$(PIP) install -q torch==2.13.0 || $(PIP) install -q "torch>=2.11"
	$(PIP) install -q -e ".[test,onnx]"
	touch $@

setup: $(VENV)/.installed

# The main job: build the embedded default (mini, synthesized weights) and generate with it.
demo: setup
	$(VENV)/bin/dsv4c build --variant mini --target cpu --backend eager --max-seq-len 1024 -o $(ART)
	$(VENV)/bin/dsv4c run $(ART) --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 16

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow" -x

clean:
	rm -rf $(VENV) artifacts .pytest_cache

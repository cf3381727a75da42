# Two commands on a fresh machine:
#   make demo   set up a virtual environment and run the demo (4 processes)
#   make test   set up the same environment and run the test suite
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
# The CPU build of PyTorch; a GPU machine brings its own torch (see README).
TORCH  ?= torch==2.13.0

.PHONY: demo test gpu-test clean

$(VENV)/.installed: pyproject.toml examples/vendor_plugin/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "$(TORCH)" setuptools
	$(PY) -m pip install --quiet -e ".[test,nvcc]"
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e examples/vendor_plugin
	touch $@

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

gpu-test:
	$(PYTHON) -m pytest -q -m gpu

clean:
	rm -rf $(VENV)

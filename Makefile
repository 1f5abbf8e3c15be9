# make train   : set up .venv (first time) and run the main job (python train.py, default experiment)
# make test    : set up .venv (first time) and run the default test suite
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install train sample test test-slow lint bench bench-cpu clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	touch $@

train: install
	$(PY) train.py $(ARGS)

sample: install
	$(PY) sample.py $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(ARGS)

lint: install
	$(VENV)/bin/ruff check src tests bench train.py sample.py

bench: install
	$(PY) bench/speed.py $(ARGS)

bench-cpu: install
	$(PY) bench/speed.py --tiny $(ARGS)

clean:
	rm -rf outputs multirun .pytest_cache

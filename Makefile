# `make demo` and `make test` each do all set-up on a fresh machine first.
PYTHON ?= python3
export PYTHON

.PHONY: setup demo test test-gpu

setup:
	./scripts/setup.sh

demo: setup
	$(PYTHON) -m compiled_attn generate

test: setup
	$(PYTHON) -m pytest tests compiled_attn -q

test-gpu:
	$(PYTHON) -m pytest tests -q -m gpu

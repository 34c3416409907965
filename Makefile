# Entry points for people and CI. Everything needs root except `make lint`.
PYTHON ?= python3

.PHONY: deps install demo test lint

deps:
	bash scripts/install-deps.sh

install: deps
	$(PYTHON) -m pip install -q --disable-pip-version-check -e '.[dev,labs]'

demo: install
	roam demo

test: install
	bash scripts/run-tests.sh

lint:
	ruff check .
	ruff format --check .
	mypy

# The two commands a newcomer needs (see README.md). Each does its own set-up first.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: drill test lint bootstrap

bootstrap:
	VENV=$(VENV) ./scripts/bootstrap

drill: bootstrap
	$(VENV)/bin/srht-readonly lab up
	$(VENV)/bin/srht-readonly lab down

test: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy srht_readonly

# The two commands a newcomer needs (see README.md). Each does its own set-up first.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: drill test lint bootstrap

bootstrap:
	VENV=$(VENV) ./scripts/bootstrap

# The drill starts its own lab and services and stops them all at the end; DRILL_ARGS e.g. --duration 4.
DRILL_ARGS ?=
drill: bootstrap
	$(VENV)/bin/srht-readonly drill $(DRILL_ARGS)

# Two passes: every test but those marked solo on two workers (a file's tests stay together, in order),
# then the solo ones alone: the drills, whose verdicts time the services they run, and the tests that
# look for leftovers across the machine. PYTEST_ARGS goes to both.
test: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -n 2 --dist loadfile -m "not solo" $(PYTEST_ARGS)
	$(VENV)/bin/pytest -m solo $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy srht_readonly

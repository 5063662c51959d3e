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

# Two passes: every test but the whole drills on two workers, then the drills (marked solo) alone,
# since their verdicts time the services they run. PYTEST_ARGS goes to both.
test: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -n 2 --dist worksteal -m "not solo" $(PYTEST_ARGS)
	$(VENV)/bin/pytest -m solo $(PYTEST_ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy srht_readonly

# isoscope: two commands to a working checkout — `make setup`, then `make test` / `make demo`.
PYTHON_VENV := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo bench clean distclean

setup:
	./scripts/setup.sh

test: setup
	$(PYTHON_VENV) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: setup
	.venv/bin/isoscope demo

# Every bench/*.py script in turn; the first failure stops the run.
bench: setup
	@set -e; found=0; for script in bench/*.py; do \
		[ -e "$$script" ] || continue; found=1; \
		echo "== $$script"; $(PYTHON_VENV) "$$script"; \
	done; [ $$found = 1 ] || echo "no bench/*.py scripts"

# Build and run artefacts; the virtualenv is kept (see distclean).
clean:
	rm -rf build dist *.egg-info isoscope-data .pytest_cache .hypothesis
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf .venv

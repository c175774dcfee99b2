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

# Every benchmark, each writing its figures (with the commit and this exact command) to
# bench/results/, then bench/RESULTS.md. These are the arguments of the recorded runs.
# The soak runs its full 10 minutes here (SOAK_MINUTES=2 for a shorter one).
SOAK_MINUTES ?= 10
bench: setup
	-$(PYTHON_VENV) bench/syscall_tax.py --rounds 5 --write bench/results/syscall_tax.md
	-$(PYTHON_VENV) bench/switch_tax.py --rounds 5 --markdown bench/results/switch_tax.md
	-$(PYTHON_VENV) bench/sample_tax.py --markdown bench/results/sample_tax.md
	-$(PYTHON_VENV) bench/rss.py --markdown bench/results/rss.md
	-$(PYTHON_VENV) bench/throughput.py --requests 200 --write bench/results/throughput.md
	-$(PYTHON_VENV) bench/accuracy.py
	-$(PYTHON_VENV) bench/soak.py --minutes $(SOAK_MINUTES) --out bench/results/soak.md
	$(PYTHON_VENV) bench/collect_results.py

# Build and run artefacts; the virtualenv is kept (see distclean).
clean:
	rm -rf build dist *.egg-info isoscope-data .pytest_cache .hypothesis
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf .venv

# Two commands on a fresh machine:
#   make demo   install, then audit the bundled examples
#   make test   install (with the test extras), then run the whole test suite
# torch is pinned to the CPU build: a plain `pip install torch` pulls a multi-GB CUDA build.

PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH := torch==2.13.0

.PHONY: install test-deps demo test bench catalog rules-catalog reports

install:
	$(PIP) install $(TORCH)
	$(PIP) install -e '.[dev]'

# Everything the test suite needs beyond `install`.
test-deps: install
	$(PIP) install -e '.[dev,onnx]'
	bash scripts/install-system-deps.sh

# The deep sigmoid example is broken on purpose: exit status 1 (findings) is expected there.
demo: install
	$(PYTHON) -m gradaudit check examples/deep_sigmoid.py || test $$? -eq 1
	$(PYTHON) -m gradaudit check examples/resnet18.py

test: test-deps
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) benchmarks/bench_static.py
	$(PYTHON) benchmarks/bench_probe.py
	$(PYTHON) benchmarks/bench_export.py

# The generated catalog (rules/, from the rule docstrings) and gallery (reports/, the
# HTML and SARIF reports of every example); tests fail when the committed ones are stale.
catalog: rules-catalog reports

rules-catalog:
	$(PYTHON) -m gradaudit rules --markdown rules/

reports:
	$(PYTHON) -m gradaudit.catalog reports reports/

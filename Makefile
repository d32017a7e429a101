# Two commands on a fresh clone, each complete on its own:
#   make demo   virtualenv .venv with torch and gradaudit, then an audit of the bundled examples
#   make test   .venv with the newest supported torch, torchvision and every extra: the whole
#               suite (after Debian's chromium for the browser test, scripts/install-system-deps.sh);
#               then .venv-oldest with the oldest supported torch: the tests marked `oldest`.
#               Fails when either run fails; both print their pytest summary.
# Both virtualenvs are kept: a second run reuses them (pip runs again only when
# pyproject.toml or this Makefile changed).
#
# torch comes from pip's configured index. On the public index (PyPI) the Linux x86-64
# torch wheels are CUDA builds that pull the nvidia-* packages (several GB); the CPU
# build comes from PyTorch's CPU index:
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

PYTHON ?= python3
VENV ?= .venv
VENV_OLDEST ?= .venv-oldest
# the torch range of pyproject.toml: its newest release (with the torchvision built for
# it) and its oldest
TORCH_NEWEST ?= torch==2.14.1 torchvision==0.29.1
TORCH_OLDEST ?= torch==2.13.0
TORCH_INDEX_URL ?=
PYTEST_ARGS ?= -q
# the interpreter of bench, catalog: the demo virtualenv unless given (make catalog PY=python3)
PY ?= $(VENV)/bin/python

TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
PY_DEPS := $(if $(filter $(VENV)/bin/python,$(PY)),$(VENV)/.demo-deps)

.PHONY: demo test test-newest test-oldest system-deps bench catalog rules-catalog reports

# The deep sigmoid example is broken on purpose: exit status 1 (findings) is expected there.
demo: $(VENV)/.demo-deps
	$(VENV)/bin/gradaudit check examples/deep_sigmoid.py || test $$? -eq 1
	$(VENV)/bin/gradaudit check examples/resnet18.py

test:
	@status=0; \
	$(MAKE) --no-print-directory test-newest || status=$$?; \
	$(MAKE) --no-print-directory test-oldest || status=$$?; \
	exit $$status

test-newest: $(VENV)/.test-deps system-deps
	@echo "== whole suite, $$($(VENV)/bin/python -c 'import torch; print("torch", torch.__version__)')" >&2
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

test-oldest: $(VENV_OLDEST)/.test-deps
	@echo "== tests marked oldest, $$($(VENV_OLDEST)/bin/python -c 'import torch; print("torch", torch.__version__)')" >&2
	$(VENV_OLDEST)/bin/python -m pytest $(PYTEST_ARGS) -m oldest

system-deps:
	bash scripts/install-system-deps.sh

%/bin/python:
	$(PYTHON) -m venv $*

$(VENV)/.demo-deps: pyproject.toml Makefile | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install $(TORCH_INDEX) $(firstword $(TORCH_NEWEST))
	$(VENV)/bin/python -m pip install -e .
	touch $@

$(VENV)/.test-deps: pyproject.toml Makefile | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install $(TORCH_INDEX) $(TORCH_NEWEST)
	$(VENV)/bin/python -m pip install -e '.[dev]'
	touch $@

$(VENV_OLDEST)/.test-deps: pyproject.toml Makefile | $(VENV_OLDEST)/bin/python
	$(VENV_OLDEST)/bin/python -m pip install $(TORCH_INDEX) $(TORCH_OLDEST)
	$(VENV_OLDEST)/bin/python -m pip install -e '.[test]'
	touch $@

bench: $(PY_DEPS)
	$(PY) benchmarks/bench_static.py
	$(PY) benchmarks/bench_probe.py
	$(PY) benchmarks/bench_export.py
	$(PY) benchmarks/bench_scaling.py
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_meta.py
	$(PY) benchmarks/accuracy.py

# The generated catalog (rules/, from the rule docstrings) and gallery (reports/, the
# HTML, SARIF and JSON reports of every example); tests fail when the committed ones are stale.
catalog: rules-catalog reports

rules-catalog: $(PY_DEPS)
	$(PY) -m gradaudit rules --markdown rules/

reports: $(PY_DEPS)
	$(PY) -m gradaudit.catalog reports reports/

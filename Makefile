# `make demo` and `make test` set everything up on a fresh machine.
PYTEST_ARGS ?=
SETUP_INPUTS := pyproject.toml requirements/constraints.txt scripts/setup_env.sh scripts/patch_torchvision.py

.PHONY: setup demo test test-all lint bench clean

setup: .venv/.installed .venv-compat/.installed

.venv/.installed: $(SETUP_INPUTS) requirements/latest.txt
	bash scripts/setup_env.sh .venv requirements/latest.txt
	touch $@

.venv-compat/.installed: $(SETUP_INPUTS) requirements/compat.txt
	bash scripts/setup_env.sh .venv-compat requirements/compat.txt
	touch $@

demo: .venv/.installed
	.venv/bin/clip-moe demo --out runs/demo

# The default suite, in both environments (newest transformers, then LLaVA's 4.37.2).
test: setup
	.venv/bin/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)
	.venv-compat/bin/python -m pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)
	.venv-compat/bin/python -m pytest -q $(PYTEST_ARGS)

lint: .venv/.installed
	.venv/bin/ruff check mllm_encoder llava_patch scripts tests
	.venv/bin/ruff format --check mllm_encoder llava_patch scripts tests

bench: .venv/.installed
	.venv/bin/python scripts/bench_moe.py

clean:
	rm -rf .venv .venv-compat runs

# DMU's CPU-side components (feature extraction/reading, cluster stage, index) at 100k..3M samples (issue 19).
.PHONY: bench-scale
bench-scale: .venv/.installed
	.venv/bin/python scripts/bench_dmu_scale.py

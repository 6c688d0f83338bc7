# `make demo` and `make test` set everything up on a fresh machine.
PYTEST_ARGS ?=
SETUP_INPUTS := pyproject.toml requirements/constraints.txt scripts/setup_env.sh scripts/patch_torchvision.py

.PHONY: setup demo test test-all test-lmms lint bench clean

setup: .venv/.installed .venv-compat/.installed

.venv/.installed: $(SETUP_INPUTS) requirements/latest.txt
	bash scripts/setup_env.sh .venv requirements/latest.txt
	touch $@

.venv-compat/.installed: $(SETUP_INPUTS) requirements/compat.txt
	bash scripts/setup_env.sh .venv-compat requirements/compat.txt
	touch $@

# The lmms-eval environment (lmms-eval 0.7.3 + the clip_moe_llava plug-in), made as docs/evaluation.md says.
.venv-lmms/.installed: $(SETUP_INPUTS) requirements/lmms-eval.txt scripts/setup_lmms_env.sh
	bash scripts/setup_lmms_env.sh .venv-lmms
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

# The plug-in's tests and a real `python -m lmms_eval eval` of a tiny CLIP-MoE LLaVA, in that environment.
test-lmms: .venv-lmms/.installed
	.venv-lmms/bin/python -m pytest -q tests/llava/test_lmms_eval_plugin.py tests/llava/test_lmms_eval_run.py

lint: .venv/.installed
	.venv/bin/ruff check mllm_encoder llava_patch scripts tests
	.venv/bin/ruff format --check mllm_encoder llava_patch scripts tests

bench: .venv/.installed
	.venv/bin/python scripts/bench_moe.py

clean:
	rm -rf .venv .venv-compat .venv-lmms runs

# DMU's CPU-side components (feature extraction/reading, cluster stage, index) at 100k..3M samples (issue 19).
.PHONY: bench-scale
bench-scale: .venv/.installed
	.venv/bin/python scripts/bench_dmu_scale.py

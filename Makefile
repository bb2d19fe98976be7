# Two environments, because llmcompressor 0.14 (torch<=2.14.0, transformers<=5.17) and
# sglang 0.5.23 (torch==2.14.1, transformers==5.19.0) cannot share one:
#   .venv         everything but SGLang: reference model, decoders, kernels, quantizer, tests
#   .venv-sglang  SGLang 0.5.23 + this package: the plugin, the server and their tests
# Exact versions live only in constraints*.txt; pyproject.toml holds ranges.
# Every target is idempotent: an up-to-date venv is reused (stamp files track the inputs).

PYTHON ?= python3.11
VENV := .venv
VENV_SGLANG := .venv-sglang
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: venv venv-sglang test test-core test-sglang test-sglang-many-servers test-sglang-others serve bench lint format clean

# Free disk the environments not there yet need while they install (measured: .venv 2.6 GB,
# .venv-sglang 11 GB: SGLang's CUDA stack), checked first so that a small disk fails with one
# line, not half-way through pip with ENOSPC. Arguments: pairs of GB and environment; one that
# exists already only updates and counts nothing.
need_disk = @set -- $(1); need=0; names=; \
	while [ -n "$$1" ]; do [ -x $$2/bin/python ] || { need=$$((need + $$1)); names="$$names $$2"; }; shift 2; done; \
	free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt $$need ]; then \
	echo "make: installing$$names needs about $$need GB of free disk; $$free GB free on $$(df -P . | awk 'NR==2 {print $$6}')" >&2; \
	exit 1; fi
DISK_VENV := 4 $(VENV)
DISK_VENV_SGLANG := 12 $(VENV_SGLANG)

# This package, editable, then its extras' dependencies. `make test` installs both environments at
# once, and an editable build writes fast_dvlm_sglang.egg-info into this folder: the short build
# step takes a lock; the long part (the dependencies, from the installed metadata) runs unlocked.
install_project = flock .install.lock $(1)/bin/pip install -q --no-deps -e . && \
	$(1)/bin/pip install -q -c $(2) 'fast-dvlm-sglang[$(3),$(4),$(5)]'

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	$(call need_disk,$(DISK_VENV))
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and alone: on CPU machines pip.conf points at the CPU wheel.
	$(VENV)/bin/pip install -q -c constraints.txt torch
	$(call install_project,$(VENV),constraints.txt,quantize,kernels,dev)
	touch $@

venv-sglang: $(VENV_SGLANG)/.installed
$(VENV_SGLANG)/.installed: pyproject.toml constraints-sglang.txt
	$(call need_disk,$(DISK_VENV_SGLANG))
	test -x $(VENV_SGLANG)/bin/python || $(PYTHON) -m venv $(VENV_SGLANG)
	$(VENV_SGLANG)/bin/pip install -q --upgrade pip
	$(call install_project,$(VENV_SGLANG),constraints-sglang.txt,sglang,router,dev)
	touch $@

# Both environments install at once (pip is about one core and much disk: 95 s and 280 s one after
# the other on 2 cores, 248 s together), the core suite runs as soon as .venv is there, then the
# SGLang suite. -O keeps each job's output in one piece.
test:
	$(call need_disk,$(DISK_VENV) $(DISK_VENV_SGLANG))
	$(MAKE) --no-print-directory -j2 -O test-core venv-sglang
	$(MAKE) --no-print-directory test-sglang

# The suites run with one OpenMP thread per process: `make test` runs several processes at once
# on a few cores (pip beside the core suite, two pytest processes and their servers), and torch's
# OpenMP threads spin while they wait for a thread another process holds off its core. Measured on
# 2 cores, tests/test_decoders.py alone: 65 s with torch's default (2 threads), 56 s with one;
# beside a process busy on one core: 194 s against 57 s; two copies at once: 300 s each against
# ~66 s (2 threads, passive waiting). Serving and benchmarks keep torch's default.
TEST_ENV := OMP_NUM_THREADS=1

test-core: venv
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q -m "not sglang" --ignore=tests/sglang $(PYTEST_ARGS) tests

# The SGLang suite as two pytest processes side by side: one alone leaves CPU idle while its
# servers start and wait on HTTP (39% of two cores over the hostile-client and server modules;
# 1654 -> 1276 s back to back, warm). tests/sglang/conftest.py marks one side
# (`many_servers_side`), split by memory. Exit status 5 (a side with nothing selected, e.g. PYTEST_ARGS names one file)
# is not a failure.
test-sglang: venv-sglang
	$(MAKE) --no-print-directory -j2 -O test-sglang-many-servers test-sglang-others

test-sglang-many-servers test-sglang-others: venv-sglang
	$(TEST_ENV) $(VENV_SGLANG)/bin/python -m pytest -q --durations=10 $(PYTEST_ARGS) \
		-m "sglang and $(if $(filter %-others,$@),not )many_servers_side" tests/sglang; \
		rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

serve: venv-sglang
	$(VENV_SGLANG)/bin/fast-dvlm serve --model demo --host $(HOST) --port $(PORT)

# The CPU benchmark suite on the demo model (README: Benchmarks): AR, MDM (stopping at a stop, and
# whole blocks: the paper's NFE convention) and spec through SGLang
# at 1, 4 and 16 requests in flight; writes benchmarks/results/bench_serve_<device>_demo.{json,md,png}.
BENCH_ARGS ?=
bench: venv-sglang
	$(VENV_SGLANG)/bin/fast-dvlm bench serve --model demo --algorithms ar,mdm,mdm-full,spec --concurrency 1,4,16 \
		--requests 128 --max-new-tokens 128 $(BENCH_ARGS)

lint: venv
	$(VENV)/bin/ruff check fast_dvlm_sglang kernels quantize tests benchmarks

format: venv
	$(VENV)/bin/ruff format fast_dvlm_sglang kernels quantize tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_SGLANG) build *.egg-info .install.lock .pytest_cache .ruff_cache

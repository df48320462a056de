# The README's two commands: `make demo` and `make test`. Both set up first.
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
FMNIST    ?= /usr/share/datasets/fashion-mnist
FORTUNES  ?= /usr/share/games/fortunes
STAMP     := $(VENV)/.installed

.PHONY: setup test test-avx2 test-heavy demo bench lint clean reliability

setup: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned, so pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# the families extra (torchvision, timm, transformers) too, so `make test` covers every model family
	$(BIN)/pip install -q -e '.[dev,families]'
	touch $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist (IDX files), the language lab's text from Debian's
# fortunes; nothing downloads at run time.
data:
	@if [ ! -e $(FMNIST)/train-images-idx3-ubyte.gz ] && [ ! -e $(FMNIST)/train-images-idx3-ubyte ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get install -y -q dataset-fashion-mnist || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q dataset-fashion-mnist; }; \
	  else echo "Fashion-MNIST IDX files missing under $(FMNIST) and no apt-get: pass their folder with --root"; fi; \
	fi
	@# the language lab's corpus (lab/text/corpus.py): Debian's fortunes, fortune-mod's quotations (BSD-3-Clause)
	@if [ ! -e $(FORTUNES)/wisdom ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get install -y -q fortunes || { $$SUDO apt-get update -q && $$SUDO apt-get install -y -q fortunes; }; \
	  else echo "the language lab's corpus is missing under $(FORTUNES) and no apt-get: install Debian's fortunes"; fi; \
	fi

# each test runs in a pytest-xdist worker process: a test that kills its process (a crash in a native kernel)
# is reported as one failed test, and the rest still run
test: setup
	$(BIN)/python -m pytest -q -n 1 -m "not heavy" --durations=25

# the numerics-sensitive tests again on the AVX2 code path of torch's and oneDNN's CPU kernels, as on a CPU
# without AVX-512 (.ci/run runs it after `make test`; docs/stack-notes.md)
test-avx2: setup
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(BIN)/python -m pytest -q -n 1 -m "numerics and not heavy"

# the cluster submission end to end and the slowest reliability cases (two `fip purify` at once, the
# secret grep, three stop signals): several minutes each on 2 cores. The sweeps run in `make test`.
test-heavy: setup
	$(BIN)/python -m pytest -q -n 1 -m heavy

# every bad-input, fault, concurrency and secret case (slow ones included) -> benchmarks/results/reliability.md
reliability: setup
	$(BIN)/python -m pytest -q tests/reliability --reliability-report benchmarks/results/reliability.md

demo: setup
	$(BIN)/fip demo

bench: setup
	$(BIN)/python -m benchmarks.run_all

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache runs mlruns mlflow.db

# The local stand-in for a cluster (cluster/local.py): Ray head + dashboard, mlflow server and an S3
# API on 127.0.0.1; addresses in runs/cluster/addresses.env. Stops only what it started.
.PHONY: cluster-up cluster-down
cluster-up: $(STAMP)
	$(BIN)/python -m cluster.local up

cluster-down:
	$(BIN)/python -m cluster.local down

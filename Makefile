# Newcomer path: `make demo` then `make test`. Everything installs into .venv.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
EXTRAS  ?= pipelines,cpu,serving,test
DATA    ?= synthetic
ROUNDS  ?= 20
METHOD  ?= fedmedclip
OUT     ?= runs/demo
PIP     := $(BIN)/pip --disable-pip-version-check -q

.PHONY: install demo train test test-fast lint format bench clean

$(BIN)/.installed: pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first and alone: any other torch spec pulls GBs of CUDA wheels. The CPU build where pip finds it
	# (this project's machines: a local wheel folder); from PyPI alone the Linux wheel is the CUDA build.
	$(PIP) install torch==2.13.0 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import torch" 
	$(PIP) install -c constraints.txt -e ".[$(EXTRAS)]" 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import fedmedclip, kfp, mlflow, onnxruntime, kserve"
	touch $@

install: $(BIN)/.installed

# The newcomer path: local stack (moto S3 with per-role keys + MLflow in .stack/), the data put in S3 one prefix
# per site, the Kubeflow pipeline run on this machine (kfp.local: the server and every site as long-lived workers
# at the same time, each task with only its own role's S3 key) on synthetic data with the tiny CLIP (or
# DATA=/path/to/brain-tumor-mri, see README "Data"), live tracking in MLflow, then the model registered and
# promoted @champion. A round costs a fraction of a second: enough rounds to watch it learn.
# Ports: S3_PORT=... MLFLOW_PORT=... (or $FEDMEDCLIP_S3_PORT / $FEDMEDCLIP_MLFLOW_PORT); by default 9000 and
# 5000, or free ones when those are taken (the demo says which).
DEMO_ROUNDS ?= 30
DEMO_SITES  ?= 3
S3_PORT     ?=
MLFLOW_PORT ?=
demo: install
	$(BIN)/fedmedclip demo --data $(DATA) --rounds $(DEMO_ROUNDS) --sites $(DEMO_SITES) --method $(METHOD) \
		$(if $(S3_PORT),--s3-port $(S3_PORT)) $(if $(MLFLOW_PORT),--mlflow-port $(MLFLOW_PORT)) \
		--out $(OUT)-$$(date +%Y%m%d-%H%M%S)

train: install
	rm -rf $(OUT) && $(BIN)/fedmedclip train --data $(DATA) --rounds $(ROUNDS) --method $(METHOD) --out $(OUT)

# PYTHONDONTWRITEBYTECODE emptied: where the environment sets it (sandboxes, some CI images), every pytest run
# and every process a test starts would compile the project's modules and rewrite the test modules again
# (about 3 s of each run's collection).
# Three pytest workers (pytest-xdist) on two cores, a test file to each at a time (its module fixtures are built
# once), the long files first (tests/conftest.py): the suite waits on servers, subprocesses and protocol
# timeouts about a fifth of its time, which a third worker fills (two workers took about 5 % longer, four
# longer too, one about 5 min; the figures: README "The suite's time").
TEST_WORKERS ?= 3
test: install
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: install
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python bench/bench_feature_cache.py

clean:
	rm -rf runs .cache .stack .pytest_cache .ruff_cache

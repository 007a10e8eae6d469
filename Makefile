# nbia-retriever developer commands. `make test` and `make demo` bootstrap everything.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed

.PHONY: install peers test demo bench soak lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,keyring,bench]'
	touch $(STAMP)

# Third-party NBIA clients, in a virtualenv of their own: their pins conflict with ours.
peers: $(PEERS_STAMP)

$(PEERS_STAMP): benchmarks/peers-requirements.txt
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --upgrade pip
	$(PEERS)/bin/python -m pip install --quiet -r benchmarks/peers-requirements.txt
	touch $(PEERS_STAMP)

test: install peers lint
	@command -v sbatch >/dev/null || echo "note: no sbatch here: the real-SLURM tests (tests/test_slurm.py) are skipped; scripts/slurm-local.sh (as root) sets up a one-node SLURM"
	NBIA_PEERS_PYTHON=$(CURDIR)/$(PEERS)/bin/python $(PY) -m pytest

demo: install
	$(PY) examples/demo.py

bench: install peers
	NBIA_PEERS_PYTHON=$(CURDIR)/$(PEERS)/bin/python $(PY) benchmarks/run.py

soak: install
	$(PY) -m pytest -m slow --timeout 3600

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy --strict src

clean:
	rm -rf $(VENV) $(PEERS) demo-work bench-work

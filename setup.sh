#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtualenv in .venv with the CPU-only stack.
# Usage: bash setup.sh            (library + all extras)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# constraints.txt pins torch/torchvision exactly, so pip takes the CPU wheel and never CUDA.
# pip's byte-compilation runs on one core; compileall on every core does the same in about half the time.
# (It exits 1 for files no Python 3.11 compiles, e.g. torch's py312_intrinsics.py; pip skips those too.)
.venv/bin/python -m pip install -q --no-compile -c constraints.txt -e ".[all]"
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')   # fails loudly
.venv/bin/python -m compileall -qq -j 0 "$SITE" || true
if ! .venv/bin/python -c "import torch,sys; sys.exit(0 if torch.version.cuda is None else 1)"; then
  echo "error: a CUDA torch build was installed; expected the CPU wheel torch==2.13.0" >&2; exit 1
fi
if .venv/bin/pip list 2>/dev/null | grep -qi '^nvidia-'; then
  echo "error: nvidia-* packages were pulled in; check constraints.txt" >&2; exit 1
fi
echo "catalens installed in .venv ($(.venv/bin/python -c 'import catalens,torch;print("torch",torch.__version__)'))"

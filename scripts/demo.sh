#!/usr/bin/env bash
# Install ranks with what a notebook needs, then run examples/ddp_demo.ipynb in a real Jupyter
# kernel, printing every cell's output here: DDP training on every GPU, or on 2 CPU ranks
# where there is none.
#
#   bash scripts/demo.sh [--out executed.ipynb]
#
# The environment is .venv in the repository, shared with scripts/test.sh (made on the first
# run, reused after; $RANKS_VENV names another): the demo installs into it only what a
# notebook needs. See scripts/_env.sh for RANKS_PYTHON, RANKS_WHEELS (install offline from a
# folder of wheels) and RANKS_TORCH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_NO_INPUT=1

# shellcheck source=scripts/_env.sh
source scripts/_env.sh
# numpy: torch warns at import without it.
ranks_env "${RANKS_VENV:-.venv}" notebook nbclient nbformat numpy

echo "==> running examples/ddp_demo.ipynb"
exec "$PY" examples/run_notebook.py examples/ddp_demo.ipynb "$@"

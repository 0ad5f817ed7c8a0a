#!/usr/bin/env bash
# Build the reference documentation (Sphinx, docs/conf.py) into build/docs, warnings as errors.
#
#   bash scripts/docs.sh            then open build/docs/index.html
#
# Sphinx comes from the project's venv ($RANKS_PY, as scripts/test.sh passes it; otherwise
# .venv is made or reused with the docs extra, see scripts/_env.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_NO_INPUT=1
if [ -z "${RANKS_PY:-}" ]; then
  # shellcheck source=scripts/_env.sh
  source scripts/_env.sh
  ranks_env "${RANKS_VENV:-.venv}" docs
  RANKS_PY=$PY
fi
# -E: read every page again (an old build/ must not hide a warning). Not -n: the type hints
# name stdlib classes, which resolve only through intersphinx, a download at build time.
"$RANKS_PY" -m sphinx -W --keep-going -E -q -b html docs build/docs
echo "==> documentation in build/docs/index.html"

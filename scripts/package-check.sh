#!/usr/bin/env bash
# Build ranks as a user gets it, check it, install it into a fresh environment and run a
# notebook against it:
#   1. the sdist, and the wheel built from it (python -m build), into build/dist: a file the
#      sdist lacks fails the wheel or its smoke test;
#   2. their metadata (twine check --strict: the README renders on PyPI; the wheel declares
#      Requires-Python and the extras the README names);
#   3. a fresh venv (build/wheel-venv) with only the wheel and its notebook extra, no torch
#      (ranks does not need it), and tests/package/smoke.ipynb run there in a real kernel:
#      the import comes from the wheel, %load_ext ranks, one call, a %%ranks cell.
#
#   bash scripts/package-check.sh
#
# build and twine come from the project's venv ($RANKS_PY, as scripts/test.sh passes it;
# otherwise .venv is made or reused, see scripts/_env.sh). Needs the network (PyPI) for the
# isolated build and the fresh venv's packages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PIP_NO_INPUT=1
# shellcheck source=scripts/_env.sh
source scripts/_env.sh
if [ -z "${RANKS_PY:-}" ]; then
  ranks_env "${RANKS_VENV:-.venv}" package
  RANKS_PY=$PY
fi
dist=build/dist fresh=build/wheel-venv

echo "==> python -m build: the sdist, and the wheel from it, into $dist"
rm -rf "$dist"
_ranks_pip "$RANKS_PY" -m build --outdir "$dist" .
echo "==> twine check --strict"
"$RANKS_PY" -m twine check --strict "$dist"/*

echo "==> a fresh environment with the wheel alone: $fresh"
rm -rf "$fresh"
"${RANKS_PYTHON:-python3}" -m venv "$fresh"
wheel=$(ls "$dist"/ranks-*.whl)
_ranks_pip "$fresh/bin/python" -m pip install -q "$wheel[notebook]" nbclient nbformat

# Not from the checkout: no PYTHONPATH, and the smoke notebook checks where ranks came from.
env -u PYTHONPATH "$fresh/bin/python" - <<'PY'
from importlib.metadata import metadata

meta = metadata("ranks")
extras = set(meta.get_all("Provides-Extra") or [])
assert meta["Requires-Python"] == ">=3.10", meta["Requires-Python"]
assert {"notebook", "ray"} <= extras, extras
assert any(c.startswith("Programming Language :: Python :: 3.1") for c in meta.get_all("Classifier"))
print("==> wheel metadata: Requires-Python", meta["Requires-Python"], "extras", sorted(extras))
PY
echo "==> tests/package/smoke.ipynb against the installed wheel"
env -u PYTHONPATH "$fresh/bin/python" examples/run_notebook.py tests/package/smoke.ipynb

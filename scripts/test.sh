#!/usr/bin/env bash
# Install everything the checks need, from a fresh clone, then run them all: ruff, mypy
# (strict on src/ranks), the test suite and, on a full run, its other passes (start methods,
# Windows, Python 3.10 and 3.13), the docs build and the built wheel in a fresh environment.
# CI runs this through .ci/run.
#
#   bash scripts/test.sh [PYTEST_ARGS...]
#
# The environment is .venv in the repository, shared with scripts/demo.sh (made on the first
# run, reused after; $RANKS_VENV names another). See scripts/_env.sh for RANKS_PYTHON,
# RANKS_WHEELS (install offline from a folder of wheels) and RANKS_TORCH; RANKS_OTHER_PYTHONS
# names the Pythons of the core passes (default "3.10 3.13"; empty: none). pytest writes a
# JUnit report to $RANKS_RESULTS (default: build/test-results/junit.xml, or $OUT/junit.xml
# where $OUT is set).
#
# Every check runs even when an earlier one fails; the exit status is non-zero if any failed.
# pytest's exit status 5 (no test collected) counts as a failure: a run that tested nothing
# must not pass.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONDONTWRITEBYTECODE=1 PIP_NO_INPUT=1

# shellcheck source=scripts/_env.sh
source scripts/_env.sh
# The browser extra (JupyterLab, Playwright) serves tests/test_browser.py, which also needs
# Chromium (.ci/run installs it); the examples extra (Accelerate, Lightning, transformers, JAX:
# CPU builds) lets tests/test_examples.py run every notebook; docs and package serve the docs
# build and the wheel check. Offline installs ($RANKS_WHEELS) go without them: those tests
# skip there, naming what is missing, and so do the docs build and the wheel check.
extras=test
[ -n "${RANKS_WHEELS:-}" ] || extras=test,examples,browser,docs,package
ranks_env "${RANKS_VENV:-.venv}" "$extras"

# python_for X.Y: an interpreter of that version (on PATH, or pyenv's), or nothing.
python_for() {
  local candidate
  for candidate in "python$1" "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$1".*/bin/python; do
    if [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
        = "$1" ]; then
      command -v "$candidate"
      return
    fi
  done
}

results=${RANKS_RESULTS:-${OUT:+$OUT/junit.xml}}
results=${results:-build/test-results/junit.xml}
mkdir -p "$(dirname "$results")"

failed=()

# Folders git does not track (an empty bench/) are absent in a fresh clone.
lint_paths=()
for path in src tests bench examples docs; do
  [ -e "$path" ] && lint_paths+=("$path")
done
echo "==> ruff check ${lint_paths[*]}"
"$PY" -m ruff check "${lint_paths[@]}" || failed+=(ruff)

echo "==> mypy (configured in pyproject.toml)"
"$PY" -m mypy || failed+=(mypy)

echo "==> pytest (JUnit report: $results)"
started=$SECONDS
status=0
"$PY" -m pytest -q --junitxml="$results" "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "error: pytest collected no test (exit status 5): nothing was tested" >&2
  failed+=("pytest (no test collected)")
elif [ "$status" -ne 0 ]; then
  failed+=("pytest (exit status $status)")
fi

# The start methods (template, spawn, portable) need no pass of their own: the notebook,
# crash-table and World tests run once per method inside pytest (START_METHODS in those
# files, the fixture in tests/conftest.py). Windows needs a kernel of its own: one more
# pass, only on a full run (PYTEST_ARGS pick what to test, and this pass would add to it).
if [ "$#" -eq 0 ]; then
  # Windows: the kernel-driven tests again, in a Jupyter kernel on Windows CPython under
  # Wine (scripts/windows-python.sh; about three minutes). Where Wine is missing this pass
  # is skipped, unless RANKS_REQUIRE_WINDOWS=1 (.ci/run installs Wine and sets it).
  windows_files=(tests/test_run_notebook.py tests/test_failures.py tests/test_world.py
                 tests/test_output.py)
  if command -v wine >/dev/null 2>&1 && [ -z "${RANKS_WHEELS:-}" ]; then
    echo "==> pytest, RANKS_TEST_KERNEL=windows: ${windows_files[*]}"
    status=0
    RANKS_PYTHON="$PY" bash scripts/windows-python.sh || status=$?
    if [ "$status" -eq 0 ]; then
      RANKS_TEST_KERNEL=windows "$PY" -m pytest -q \
        --junitxml="${results%.xml}-windows.xml" "${windows_files[@]}" || status=$?
    fi
    [ "$status" -eq 0 ] || failed+=("pytest RANKS_TEST_KERNEL=windows (exit status $status)")
  elif [ "${RANKS_REQUIRE_WINDOWS:-0}" = 1 ]; then
    echo "error: RANKS_REQUIRE_WINDOWS=1 but wine is not installed" >&2
    failed+=("Windows pass (no wine)")
  else
    echo "==> skipped: the Windows pass (wine is not installed, or installing offline)"
  fi

  # Supported Pythons: the kernel-driven core again on the oldest (3.10) and the newest one
  # here (3.13), each in its own venv (.venv-pyX.Y) without torch: PyPI has no CPU build of
  # torch for Linux (its wheels pull several GB of CUDA libraries), and ranks does not need
  # it; the tests that do skip, naming it (about a minute each, plus the venv the first time).
  core_files=(tests/test_run_notebook.py tests/test_failures.py tests/test_world.py)
  other_pythons=${RANKS_OTHER_PYTHONS-3.10 3.13}
  if [ -n "${RANKS_WHEELS:-}" ]; then  # the wheels folder holds this Python's wheels only
    echo "==> skipped: the passes on Python ${other_pythons:-(none)} (installing offline)"
    other_pythons=""
  fi
  for version in $other_pythons; do
    interpreter=$(python_for "$version")
    if [ -z "$interpreter" ]; then
      if [ "${RANKS_REQUIRE_PYTHONS:-0}" = 1 ]; then
        echo "error: RANKS_REQUIRE_PYTHONS=1 but there is no Python $version" >&2
        failed+=("Python $version pass (no interpreter)")
      else
        echo "==> skipped: the Python $version pass (no python$version here)"
      fi
      continue
    fi
    echo "==> pytest on Python $version ($interpreter), without torch: ${core_files[*]}"
    status=0
    # The default start method only (the template): the other methods' code does not
    # depend on the Python version more than the template's, and each would add a minute.
    (RANKS_PYTHON=$interpreter RANKS_TORCH=none ranks_env ".venv-py$version" test \
      && RANKS_START_METHOD=template "$PY" -m pytest -q \
           --junitxml="${results%.xml}-py$version.xml" "${core_files[@]}") \
      || status=$?
    [ "$status" -eq 0 ] || failed+=("pytest on Python $version (exit status $status)")
  done

  if [ -z "${RANKS_WHEELS:-}" ]; then
    echo "==> docs: sphinx-build -W into build/docs"
    RANKS_PY=$PY bash scripts/docs.sh || failed+=(docs)
    echo "==> package: sdist and wheel, twine check, the wheel in a fresh venv"
    RANKS_PY=$PY bash scripts/package-check.sh || failed+=(package-check)
  else
    echo "==> skipped: the docs build and the wheel check (installing offline)"
  fi
fi

if [ "${#failed[@]}" -ne 0 ]; then
  echo "FAILED: ${failed[*]} (pytest took $((SECONDS - started)) s)" >&2
  exit 1
fi

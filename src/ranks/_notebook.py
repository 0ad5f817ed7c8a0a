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

from ._stacks import rank_label

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


def in_ipykernel() -> bool:
    """True when this code runs in a Jupyter kernel (output then goes to a cell)."""
    if "ipykernel" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def ask_user(prompt: str) -> str | None:
    """A line the user types: into the notebook's input box (ipykernel sends an
    input_request on its stdin channel), or at the terminal; None when nothing can answer.

    Nothing can answer a client that sends no input (nbclient, ``allow_stdin=False``: ipykernel
    raises StdinNotImplementedError) nor a script whose stdin is no terminal (a pipe that
    may never be written, ``/dev/null``). EOFError (Ctrl+D) and KeyboardInterrupt propagate.
    """
    if in_ipykernel():
        try:
            return input(prompt)
        except NotImplementedError:  # IPython's StdinNotImplementedError subclasses it
            return None
    if sys.stdin is None or sys.stdin.closed or not sys.stdin.isatty():
        return None
    return input(prompt)


class NotebookSink:
    """Output into the calling cell: stream lines, plus one live display per progress bar.

    A line redrawn with carriage returns (tqdm) becomes a display that is updated in place
    (at most every PROGRESS_INTERVAL seconds and never more than that behind: the supervisor
    wakes at ``due()``; always with its final state), instead of one stream line per redraw.
    """

    PROGRESS_INTERVAL = 0.1

    def __init__(self) -> None:
        self._bars: dict[tuple[int, str], _Bar] = {}

    def line(self, rank: int, stream: str, text: str) -> None:
        bar = self._bars.pop((rank, stream), None)
        if bar is not None:  # the redrawn line is finished: its final state, in place
            bar.show(f"[rank {rank}] {text}")
            return
        target = sys.stdout if stream == "stdout" else sys.stderr
        target.write(f"[rank {rank}] {text}\n")

    def group_line(self, ranks: list[int], stream: str, text: str) -> None:
        target = sys.stdout if stream == "stdout" else sys.stderr
        target.write(f"[{rank_label(ranks)}] {text}\n")

    def note(self, rank: int, text: str) -> None:
        sys.stderr.write(f"[rank {rank}] {text}\n")  # a stream line: the bar stays a bar

    def progress(self, rank: int, stream: str, text: str) -> None:
        bar = self._bars.get((rank, stream))
        if bar is None:
            self.flush()  # lines printed before the bar stay above it
            bar = self._bars[(rank, stream)] = _Bar()
        bar.pending = f"[rank {rank}] {text}"
        bar.show_if_due(self.PROGRESS_INTERVAL)

    def flush(self) -> None:
        for bar in self._bars.values():
            bar.show_if_due(self.PROGRESS_INTERVAL)
        for target in (sys.stdout, sys.stderr):
            target.flush()

    def due(self) -> float | None:
        # A redraw held back by the interval must not wait for the rank's next write: after
        # a quick pair of redraws a rank may go quiet for a whole training step.
        held = [bar.when + self.PROGRESS_INTERVAL for bar in self._bars.values()
                if bar.pending != bar.shown]
        return min(held, default=None)


class _Bar:
    _ids = 0

    def __init__(self) -> None:
        _Bar._ids += 1
        self.display_id = f"ranks-{os.getpid()}-{_Bar._ids}"
        self.shown: str | None = None
        self.pending = ""
        self.when = 0.0

    def show_if_due(self, interval: float) -> None:
        import time

        if self.pending != self.shown and time.monotonic() - self.when >= interval:
            self.show(self.pending)

    def show(self, text: str) -> None:
        import time

        from IPython.display import display, update_display

        bundle = {"text/plain": text}
        if self.shown is None:
            display(bundle, raw=True, display_id=self.display_id)  # type: ignore[no-untyped-call]
        else:
            update_display(bundle, raw=True, display_id=self.display_id)  # type: ignore[no-untyped-call]
        self.shown = self.pending = text
        self.when = time.monotonic()

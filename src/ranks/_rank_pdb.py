"""pdb on a rank, driven from the calling cell: the rank side.

``breakpoint()``, ``pdb.set_trace()`` and a post-mortem (``World.debug``) open a
:class:`RankPdb`: a plain ``pdb.Pdb`` whose output is the rank's own (fd 1, relayed and
labelled like any other output) and whose input lines come from the kernel:

    rank, main thread                rank, control thread        kernel (Supervisor)
    RankPdb reads a line:
      flush the output, send DebugPrompt(id, "[rank 1] (Pdb) ") --> input(prompt): the
      wait for the line for id   <-- deliver() <-- DebugInput(id, line) --  cell's input box

The kernel serves one prompt at a time. A line ``None`` means that nobody can answer (a
notebook client without stdin, a script without a terminal): pdb continues, as after `c`.
The wait for a line is interruptible: the kernel's interrupt (SIGINT, or Interrupt where
signals cannot be sent) raises KeyboardInterrupt in it, which ends the session and the call.

Installed by the rank's entry point once the rank is Ready; importing this module only
defines it (it imports pdb, which a rank imports anyway to install it).
"""

from __future__ import annotations

import itertools
import os
import pdb
import queue
import sys
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import IO, Any, cast

from . import _context
from ._protocol import DebugPrompt

# How often the wait for a line wakes: Windows delivers a raised SIGINT to the main thread
# only between bytecodes, never inside a blocking queue wait.
_LINE_POLL = 0.25
# The kernel's answers; a line is taken only for the prompt it answers (see _RemoteLines).
_lines: queue.Queue[tuple[int, str | None]] = queue.Queue()
_prompt_ids = itertools.count(1)
_ask_kernel: Callable[[DebugPrompt], None] | None = None


def install(ask_kernel: Callable[[DebugPrompt], None]) -> None:
    """Make ``breakpoint()`` and ``pdb.set_trace()`` open a RankPdb.

    ``ask_kernel`` flushes the rank's output and sends the prompt on the control channel.
    """
    global _ask_kernel
    _ask_kernel = ask_kernel
    sys.breakpointhook = _breakpoint
    pdb.set_trace = set_trace  # pdb.set_trace() builds a Pdb of its own


def deliver(prompt_id: int, line: str | None) -> None:
    """The control thread hands over the kernel's answer to a prompt."""
    _lines.put((prompt_id, line))


def set_trace(*, header: str | None = None) -> None:
    """``pdb.set_trace()`` on a rank: stop in the caller's frame."""
    _stop(sys._getframe().f_back, header)


def _breakpoint(*args: Any, **kwargs: Any) -> None:
    """``breakpoint()`` on a rank; ``PYTHONBREAKPOINT=0`` turns it off, as it does anywhere
    (sys.breakpointhook reads it, and this replaces sys.breakpointhook)."""
    if os.environ.get("PYTHONBREAKPOINT") == "0":
        return
    _stop(sys._getframe().f_back, kwargs.get("header"))


def _stop(frame: FrameType | None, header: str | None) -> None:
    debugger = RankPdb()
    if header is not None:
        debugger.message(header)
    debugger.set_trace(frame)


def post_mortem() -> None:
    """pdb at the frame where the last call on this rank failed (``sys.last_traceback``)."""
    tb: TracebackType | None = getattr(sys, "last_traceback", None)
    if tb is None:
        rank = _context.current().rank
        raise RuntimeError(f"rank {rank} has no failure to debug: no call on it raised yet")
    debugger = RankPdb()
    debugger.reset()
    debugger.interaction(None, tb)


class RankPdb(pdb.Pdb):
    """pdb reading its lines from the kernel; its prompt travels with the request for a line.

    ``cmd.Cmd`` writes the prompt to stdout before reading a line; here it would reach the
    cell as the start of the next output line. The prompt is kept aside instead and shown
    by the kernel as the input box's prompt.
    """

    def __init__(self) -> None:
        # nosigint: pdb's own SIGINT handler would replace the rank's, which tells the
        # kernel an interrupt arrived; an interrupt here ends the session and the call.
        stdin = cast(IO[str], _RemoteLines(self))  # cmd.Cmd only calls its readline()
        super().__init__(stdin=stdin, stdout=sys.stdout, nosigint=True)

    @property
    def prompt(self) -> str:
        return ""

    @prompt.setter
    def prompt(self, value: str) -> None:
        self.label = value


class _RemoteLines:
    """The debugger's stdin: each readline asks the kernel for a line."""

    def __init__(self, debugger: RankPdb) -> None:
        self._debugger = debugger

    def readline(self) -> str:
        assert _ask_kernel is not None, "RankPdb used before install()"
        prompt_id = next(_prompt_ids)
        rank = _context.current().rank
        _ask_kernel(DebugPrompt(prompt_id, f"[rank {rank}] {self._debugger.label}"))
        while True:
            try:
                answered, line = _lines.get(timeout=_LINE_POLL)
            except queue.Empty:
                continue
            if answered != prompt_id:
                continue  # the answer to a prompt whose wait was interrupted
            if line is None:
                return "continue\n"  # nobody can answer: go on, as after `c`
            return line + "\n"

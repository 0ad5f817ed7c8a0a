"""Errors that `ranks` raises in the kernel, and how a rank's exception is rebuilt there.

Two families reach the user:

* the user's own exception, re-raised with its original type. Its ``__cause__`` is a
  :class:`RankTraceback` holding the traceback text formatted on the rank (with the notebook's
  source lines), and a note names the rank, pid and device;
* everything else is a :class:`RanksError`: a rank that died (:class:`RankCrashed`), a call
  that ran past its deadline (:class:`RanksTimeout`), a rank exception that could not travel
  back (:class:`RankFailed`), or a World that can no longer be used (:class:`WorldBroken`).

Every error keeps its facts as attributes and pickles (``__reduce__``), so it survives being
sent on (to a Ray driver, to a log) without losing them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

from ._stacks import rank_label


class RanksError(Exception):
    """Base class of every failure of `ranks` itself (not raised by the user's code)."""


class RankTraceback(Exception):
    """The traceback of an exception as the rank printed it; set as ``__cause__``."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text.rstrip("\n")


def _tail(lines: Sequence[str], limit: int = 20) -> str:
    shown = list(lines)[-limit:]
    return "\n".join(f"    {line}" for line in shown)


class RankCrashed(RanksError):
    """A rank process ended without reporting back: a signal, ``os._exit`` or ``sys.exit``.

    ``exitcode`` is as ``Popen.returncode`` has it (negative: the signal), or TEMPLATE_ENDED
    where the template the rank was forked from died first and took its status with it.
    """

    def __init__(
        self,
        rank: int,
        pid: int,
        exitcode: int | None,
        device: str = "cpu",
        last_lines: Sequence[str] = (),
        during: str = "running the function",
        log_path: str | None = None,
    ) -> None:
        self.rank = rank
        self.pid = pid
        self.exitcode = exitcode
        self.device = device
        self.last_lines = tuple(last_lines)
        self.during = during
        self.log_path = log_path  # everything it printed, kept until the kernel exits
        super().__init__(self._message())

    @property
    def signal_name(self) -> str | None:
        """``"SIGSEGV"`` and the like when a signal ended the rank, else ``None``."""
        if self.exitcode is None or self.exitcode >= 0:
            return None
        import signal

        try:
            return signal.Signals(-self.exitcode).name
        except ValueError:
            return f"signal {-self.exitcode}"

    def _message(self) -> str:
        if self.signal_name is not None:
            how = f"was killed by {self.signal_name}"
            hint = {
                "SIGKILL": " (the kernel's OOM killer sends SIGKILL when memory runs out;"
                " `dmesg` says so if it did)",
                "SIGSEGV": " (a crash in native code: an extension, a driver, or a bad"
                " pointer; the rank's fault handler printed its Python stack above)",
                "SIGABRT": " (native code aborted; look for an assertion in the output)",
            }.get(self.signal_name, "")
            how += hint
        elif self.exitcode is None:
            how = "ended with an unknown status"
        elif self.exitcode == TEMPLATE_ENDED:
            how = ("ended with the ranks template it was forked from (something ended that"
                   " process, and a rank does not outlive it)")
        elif self.exitcode == ENDED_BY_RANKS:
            how = "was ended by ranks (on Windows: its job object, its whole process tree)"
        elif self.exitcode in _WINDOWS_CRASHES:
            how = f"crashed with {self.exitcode:#x}, {_WINDOWS_CRASHES[self.exitcode]}"
        else:
            how = f"exited with code {self.exitcode} (sys.exit or os._exit)"
        text = f"rank {self.rank} (pid {self.pid}, {self.device}) {how} while {self.during}."
        if self.exitcode == TEMPLATE_ENDED:
            text += (" The next start makes a new template; if this repeats,"
                     " RANKS_START_METHOD=spawn starts ranks without one.")
        if self.last_lines:
            text += "\nLast lines it printed:\n" + _tail(self.last_lines)
        else:
            text += "\nIt printed nothing before it ended."
        if self.log_path is not None:
            text += f"\nAll it printed (until the kernel exits): {self.log_path}"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            type(self),
            (self.rank, self.pid, self.exitcode, self.device, self.last_lines, self.during,
             self.log_path),
        )


# The exit code of a Windows rank that ranks ended (its job object terminated): "RANK".
ENDED_BY_RANKS = 0x52414E4B
# Stands in for the exit code of a rank forked from the template when the template died
# before it could report the rank's status (only a process's parent can): "TMPL".
TEMPLATE_ENDED = 0x544D504C
# Windows ends a crashed process with an NTSTATUS code as its exit code (no signals there).
_WINDOWS_CRASHES = {
    0xC0000005: "an access violation (a crash in native code: an extension, a driver, or a"
                " bad pointer; the rank's fault handler printed its Python stack above)",
    0xC00000FD: "a stack overflow",
    0xC0000409: "a fail-fast exception (native code aborted; look for an assertion above)",
    0xC0000017: "no memory left",
}


class RanksTimeout(RanksError):
    """The call ran past ``timeout``; ``.stacks`` maps each rank still running to its stack.

    ``waited``: the time ran out while the call waited for another thread's call on the same
    World; nothing was sent to the ranks.
    """

    def __init__(
        self, timeout: float, stacks: Mapping[int, str], waited: bool = False
    ) -> None:
        self.timeout = timeout
        self.stacks = dict(stacks)
        self.waited = waited
        super().__init__(self._message())

    def _message(self) -> str:
        running = sorted(self.stacks)
        if self.waited:
            return (f"the call did not start within {self.timeout:g} s: another thread's"
                    " call on this World was still running (a World runs one call at a"
                    " time); nothing was sent to the ranks, and the World is fine")
        if not running:
            return (f"the call did not finish within {self.timeout:g} s: the ranks were still"
                    " starting (the warm template imports torch and the notebook's modules"
                    " when it starts, and again after they or the environment change);"
                    " nothing was left running")
        text = (
            f"the call did not finish within {self.timeout:g} s; ranks {running} were still"
            " running and have been stopped. Where each one was (ranks that were in the"
            " same place, once):"
        )
        places: dict[str, list[int]] = {}
        for rank in running:
            stack = self.stacks[rank].rstrip() or "(no stack: the rank did not answer)"
            places.setdefault(stack, []).append(rank)
        for stack, ranks in places.items():
            text += f"\n--- {rank_label(ranks)} ---\n{stack}"
        return text

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.timeout, self.stacks, self.waited))


class RankFailed(RanksError):
    """A rank raised an exception that could not be pickled back; its type and text are kept."""

    def __init__(self, rank: int, type_name: str, message: str, traceback_text: str) -> None:
        self.rank = rank
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text
        super().__init__(f"rank {rank} raised {type_name}: {message}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.rank, self.type_name, self.message, self.traceback_text))


class WorldBroken(RanksError):
    """A rank of a World died or was killed; the World must be restarted."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"this World is broken: {reason}. Start a new one (or `%ranks restart`)."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason,))


def add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note`` where it exists (3.11+); on 3.10 the note rides in ``__notes__``."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # pragma: no cover - Python 3.10
        notes = list(getattr(exc, "__notes__", []))
        notes.append(note)
        with contextlib.suppress(AttributeError):
            exc.__notes__ = notes  # type: ignore[attr-defined]

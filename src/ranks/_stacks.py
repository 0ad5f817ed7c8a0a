"""The Python stacks of a World's ranks: faulthandler's dumps, read and collapsed.

    kernel asks (SIGUSR1; DumpStacks on the portable start)
      --> the rank's faulthandler writes every thread's stack to its stacks file
      --> parse_dump(): the rank's threads, less ranks' own machinery
      --> Stacks: identical thread stacks shown once, with the ranks that share them

A rank's control thread and lifeline, and the frames of ranks' own modules, are never the
user's and are dropped; a main thread that waits for the next call reads "idle". Shown by
``World.stacks()`` / ``%ranks stacks``, and with the KeyboardInterrupt of a call whose
ranks did not stop at the interrupt, so that a hang says where it hangs.

Everything here is pure: the supervisor collects the dumps.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

# Frames of ranks' own code on a rank: its entry point, the call it runs, the template that
# forked it, and the `python -c` line that started it.
_OUR_FILES = ("ranks/_worker.py", "ranks/_rank_call.py", "ranks/_template.py",
              'File "<string>"')
# Threads that are ranks' own: the control-channel reader, the lifeline (portable start).
_OUR_THREADS = {"_read_commands", "_follow_parent"}
# A rank's main thread in none of these functions is between calls, in ranks' own code
# (waiting for a command, flushing, starting its control thread): idle.
_BUSY = {"execute", "_set_up_devices", "_tear_down"}
_FRAME = re.compile(r'^\s*File "(?P<file>.*)", line (?:\d+|\?\?\?) in (?P<function>.*)$')

IDLE = "idle (waiting for the next call)"
# What a rank as a whole says instead of its threads:
NO_ANSWER = "no stack (the rank did not write one in time)"
ENDED = "ended"
_WHOLE_RANK = (NO_ANSWER, ENDED)


@dataclass(frozen=True)
class ThreadStack:
    """One thread of a rank: its frames as faulthandler wrote them (most recent call first),
    or a ``summary`` said instead (:data:`IDLE`; :data:`NO_ANSWER` and :data:`ENDED` stand
    for the whole rank)."""

    main: bool
    frames: tuple[str, ...] = ()
    summary: str | None = None


def parse_dump(dump: str) -> tuple[ThreadStack, ...]:
    """A rank's faulthandler dump as its threads, main thread first; ranks' own dropped.

    An empty dump (the rank never wrote it) is one thread saying :data:`NO_ANSWER`.
    """
    if not dump.strip():
        return (ThreadStack(main=True, summary=NO_ANSWER),)
    threads = []
    for block in re.split(r"\n\s*\n", dump.strip()):
        lines = block.splitlines()[1:]  # the header names a thread id, which differs per rank
        ours = {_function(line) for line in lines if _our_file(line)}
        if not lines or ours & _OUR_THREADS:
            continue
        main = "main" in ours  # _worker.main(): only ever on the rank's main thread
        if main and not ours & _BUSY:
            threads.append(ThreadStack(main=True, summary=IDLE))
            continue
        frames = tuple(line.strip() for line in lines if not _our_file(line))
        if frames in ((), ("<no Python frame>",)):
            continue
        threads.append(ThreadStack(main=main, frames=frames))
    return tuple(sorted(threads, key=lambda thread: not thread.main))


def _our_file(line: str) -> bool:
    line = line.replace("\\", "/")  # Windows paths
    return any(ours in line for ours in _OUR_FILES)


def _function(line: str) -> str | None:
    match = _FRAME.match(line)
    return None if match is None else match["function"]


def rank_label(ranks: Iterable[int]) -> str:
    """``rank 7``, ``ranks 0-6``, ``ranks 0, 2, 5``, ``ranks 0-3, 6``: ranges where
    contiguous."""
    chosen = sorted(set(ranks))
    runs: list[list[int]] = []
    for rank in chosen:
        if runs and rank == runs[-1][-1] + 1:
            runs[-1].append(rank)
        else:
            runs.append([rank])
    parts = [str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs]
    return ("rank " if len(chosen) == 1 else "ranks ") + ", ".join(parts)


@dataclass(frozen=True)
class StackGroup:
    """One distinct thread stack and, for each rank that has it, in how many threads."""

    stack: ThreadStack
    threads: Mapping[int, int]  # rank -> how many of its threads have this stack

    def heading(self, with_ranks: bool = True) -> str:
        """``ranks 0-3, main thread``: who has this stack (``with_ranks``) in which thread."""
        parts = [rank_label(self.threads)] if with_ranks else []
        if self.stack.summary not in _WHOLE_RANK:
            parts.append(self._which_threads())
        return ", ".join(parts)

    def _which_threads(self) -> str:
        counts = set(self.threads.values())
        if self.stack.main:
            return "main thread"
        if counts == {1}:
            return "another thread"
        if len(counts) == 1:
            (count,) = counts
            return f"{count} threads" + (" each" if len(self.threads) > 1 else "")
        return f"{sum(self.threads.values())} threads in all"


def collapse(stacks: Mapping[int, Sequence[ThreadStack]]) -> list[StackGroup]:
    """Identical thread stacks once each, with the ranks that share them: main threads
    first, then by the lowest rank that has the stack."""
    groups: dict[ThreadStack, dict[int, int]] = {}
    for rank in sorted(stacks):
        for thread in stacks[rank]:
            counts = groups.setdefault(thread, {})
            counts[rank] = counts.get(rank, 0) + 1
    ordered = sorted(groups.items(), key=lambda item: (not item[0].main, min(item[1])))
    return [StackGroup(stack, threads) for stack, threads in ordered]


def render(groups: Iterable[StackGroup], with_ranks: bool = True) -> str:
    """The groups as text: a heading each, then its frames (most recent call first)."""
    parts = []
    for group in groups:
        heading, stack = group.heading(with_ranks), group.stack
        if stack.summary is not None:
            parts.append(f"{heading}: {stack.summary}" if heading else stack.summary)
        else:
            frames = "\n".join(f"  {frame}" for frame in stack.frames)
            parts.append(f"{heading} (most recent call first):\n{frames}")
    return "\n".join(parts)


def rank_text(threads: Sequence[ThreadStack]) -> str:
    """One rank's threads as :func:`render` shows them, without naming the rank."""
    return render(collapse({0: threads}), with_ranks=False)


@dataclass(frozen=True, repr=False)
class Stacks:
    """The live stacks of a World's ranks (``World.stacks()``, ``%ranks stacks``).

    ``by_rank`` maps each rank to its threads; shown (``str``, ``repr``, in a notebook)
    with identical stacks collapsed: "ranks 0-6, main thread", then the frames.
    """

    by_rank: Mapping[int, Sequence[ThreadStack]]

    @property
    def groups(self) -> list[StackGroup]:
        return collapse(self.by_rank)

    def __str__(self) -> str:
        return render(self.groups)

    def __repr__(self) -> str:  # IPython shows this as the cell's result: plain text
        return str(self)


def hang_note(hung: Mapping[int, Sequence[ThreadStack]]) -> str:
    """The note an interrupted call's KeyboardInterrupt carries: where the ranks that did
    not stop at the interrupt were when they were forced to."""
    one = len(hung) == 1
    return (f"ranks: where {rank_label(hung)} {'was' if one else 'were'} when"
            f" {'it' if one else 'they'} had to be forced to stop (code that ignores SIGINT,"
            " or native code such as a collective whose peers have stopped, never sees"
            f" the interrupt):\n{Stacks(hung)}")

"""What the ranks print: into the calling cell, labelled by rank, and in full into a log.

Data flow for one rank's fd 1 or fd 2 (read by the supervisor in the calling thread, so
ipykernel files it under the calling cell):

    bytes --> log file (everything, always; line by line, so stdout and stderr never cut
          |   each other's lines)
          --> decoder + line assembly --> complete line --> rate limit --> sink (shown)
                                      \\-> "\\r" redraw --> throttle --> sink progress

* A line is shown when its newline arrives, or when the call ends (a partial line).
* A carriage return redraws a line (tqdm and friends): the sink keeps one updating line per
  rank and stream (a display in a notebook, a throttled snapshot in a terminal), and the
  finished line replaces it.
* A flood is cut by a per-rank token bucket: what is not shown is counted, summarised in
  the cell with the path of the rank's full log, and kept in that log. A line longer than
  MAX_LINE_CHARS is shown cut, with that path; only its head is held in memory, so one
  endless line costs neither quadratic copying nor a browser tab.
* The last lines of each rank are kept for the error message when it dies.
* Identical lines that several ranks print within GROUP_WINDOW are shown once, labelled
  with all of them (``[ranks 0-3] epoch 3 done``); a line is held at most that long, and
  every rank's own order is kept. ``RANKS_GROUP_OUTPUT=0`` turns it off (read per call).
  The logs and the tails are per rank and keep every line.

Output that arrives between two calls of a World belongs to no cell: it is logged only,
and a line it left unfinished is closed in the log, not completed into the next call's cell.
Output belongs to a call by when it was written, not by which thread wrote it: fds 1 and 2
are per process, so a background thread printing while a later call runs shows there.
"""

from __future__ import annotations

import codecs
import contextlib
import itertools
import os
import shutil
import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import IO, Protocol

from . import _runtime_dir
from ._stacks import rank_label

TAIL_LINES = 30
LOG_HOLD_BYTES = 1 << 20  # an unfinished line longer than this goes to the log as it is
KEEP_LOG_DIRS = 20  # the logs of this many recent Worlds of a kernel stay on disk
# Per rank: a burst of BURST_LINES, then RATE_LINES a second; enough for training logs,
# well under what a browser (and Jupyter's IOPub rate limit) can take.
BURST_LINES = 1000
RATE_LINES = 200.0
# A line is shown cut after this many characters; each started CHARS_PER_LINE of it counts
# as one line for the rate, so long lines cannot carry a flood past the limit in bytes.
MAX_LINE_CHARS = 10_000
CHARS_PER_LINE = 1_000
DROP_REPORT_INTERVAL = 2.0
# How long a shown line waits for the same line from other ranks. Short enough that a
# single rank's output still looks live; ranks in step print within a few ms of each other.
GROUP_WINDOW = 0.1
GROUP_SWITCH = "RANKS_GROUP_OUTPUT"
GROUP_LOOKAHEAD = 32  # how far back in another rank's queue a line is looked for


class Sink(Protocol):
    """Where shown output goes: a terminal (plain labelled lines) or a notebook cell."""

    def line(self, rank: int, stream: str, text: str) -> None: ...

    def group_line(self, ranks: list[int], stream: str, text: str) -> None:
        """One line that several ranks printed alike."""
        ...

    def progress(self, rank: int, stream: str, text: str) -> None: ...

    def note(self, rank: int, text: str) -> None:
        """A line of ranks' own about the rank (a flood summary), on stderr; never in the
        place of the rank's progress display."""
        ...

    def flush(self) -> None: ...

    def due(self) -> float | None:
        """When flush() will have a held-back redraw to show (time.monotonic()), if ever."""
        ...


class TerminalSink:
    """Labelled lines on the kernel's sys.stdout / sys.stderr; redraws as rare snapshots."""

    SNAPSHOT_INTERVAL = 5.0

    def __init__(self) -> None:
        self._last_snapshot: dict[tuple[int, str], float] = {}

    def line(self, rank: int, stream: str, text: str) -> None:
        self._last_snapshot.pop((rank, stream), None)
        _target(stream).write(f"[rank {rank}] {text}\n")

    def group_line(self, ranks: list[int], stream: str, text: str) -> None:
        for rank in ranks:
            self._last_snapshot.pop((rank, stream), None)
        _target(stream).write(f"[{rank_label(ranks)}] {text}\n")

    def progress(self, rank: int, stream: str, text: str) -> None:
        now = time.monotonic()
        last = self._last_snapshot.get((rank, stream))
        if last is None:
            self._last_snapshot[(rank, stream)] = now  # first redraw: wait for more
        elif now - last >= self.SNAPSHOT_INTERVAL:
            self._last_snapshot[(rank, stream)] = now
            _target(stream).write(f"[rank {rank}] {text}\n")

    def note(self, rank: int, text: str) -> None:
        sys.stderr.write(f"[rank {rank}] {text}\n")

    def flush(self) -> None:
        for stream in ("stdout", "stderr"):
            with contextlib.suppress(OSError, ValueError):
                _target(stream).flush()

    def due(self) -> float | None:
        return None  # snapshots are rare on purpose; the finished line always comes


def _target(stream: str) -> IO[str]:
    return sys.stdout if stream == "stdout" else sys.stderr


class _Grouper:
    """Holds each rank's shown lines for GROUP_WINDOW, so that equal lines of several ranks
    leave together.

    Each rank's lines wait in a queue of their own and leave in order. The oldest waiting
    line leaves first, with the ranks whose next line is the same; if some rank has that
    line further back in its queue (it printed another line first, as ranks do that print
    their own loss before a common "done"), that rank's earlier lines leave first, so the
    line can still be shown once.
    """

    def __init__(self) -> None:
        self._queues: dict[int, deque[tuple[str, str, float]]] = {}
        # How many held lines are each (stream, text): most lines are a rank's own, and
        # those need no search through the other ranks' queues.
        self._counts: Counter[tuple[str, str]] = Counter()

    def add(self, rank: int, stream: str, text: str) -> None:
        self._queues.setdefault(rank, deque()).append((stream, text, time.monotonic()))
        self._counts[(stream, text)] += 1

    def due(self) -> float | None:
        heads = [queue[0][2] for queue in self._queues.values() if queue]
        return min(heads) + GROUP_WINDOW if heads else None

    def release(self, sink: Sink, everything: bool = False) -> None:
        while True:
            waiting = {rank: queue for rank, queue in self._queues.items() if queue}
            if not waiting:
                return
            oldest = min(waiting, key=lambda rank: waiting[rank][0][2])
            if not everything and waiting[oldest][0][2] + GROUP_WINDOW > time.monotonic():
                return
            leader = self._leader(oldest, waiting)
            stream, text, _ = waiting[leader][0]
            if self._counts[(stream, text)] == 1:
                ranks = [leader]
            else:
                ranks = [rank for rank, queue in sorted(waiting.items())
                         if queue[0][:2] == (stream, text)]
            for rank in ranks:
                waiting[rank].popleft()
            self._counts[(stream, text)] -= len(ranks)
            if not self._counts[(stream, text)]:
                del self._counts[(stream, text)]
            if len(ranks) == 1:
                sink.line(ranks[0], stream, text)
            else:
                sink.group_line(ranks, stream, text)

    def _leader(self, rank: int, waiting: dict[int, deque[tuple[str, str, float]]]) -> int:
        """The rank whose next line leaves now: ``rank``, or one that has ``rank``'s next
        line further back (then first its own lines), and so on; ``rank`` on a cycle."""
        seen = {rank}
        current = rank
        while True:
            line = waiting[current][0][:2]
            if self._counts[line] == 1:
                return current  # no other rank holds it
            behind = [other for other, queue in waiting.items() if other != current
                      and any(held[:2] == line for held in itertools.islice(
                          queue, 1, GROUP_LOOKAHEAD))]
            if not behind:
                return current
            if behind[0] in seen:
                return rank  # ranks print the same lines in different orders
            current = behind[0]
            seen.add(current)


class _Assembler:
    """Bytes of one stream of one rank into finished lines and the line being redrawn."""

    def __init__(self, log_path: str) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.partial = ""
        self.redrawn = False  # the partial line was redrawn with "\r" since its last newline
        self.cut = 0  # characters of the partial line not kept: it ran past MAX_LINE_CHARS
        self.log_path = log_path

    def feed(self, data: bytes) -> tuple[list[str], str | None]:
        text = self.partial + self.decoder.decode(data)
        *lines, self.partial = text.split("\n")
        finished = [self._shorten(_visible(line)) for line in lines]
        if lines:
            self.redrawn = False
        # A "\r" at the very end is most often the first half of a Windows "\r\n" cut by
        # the read: a redraw only once something follows it.
        if "\r" in self.partial.rstrip("\r"):
            self.redrawn = True
            self.cut = 0  # what was cut belonged to states redrawn since
            self.partial = "\r" + _visible(self.partial)  # keep only what a terminal shows now
        if len(self.partial) > MAX_LINE_CHARS:
            self.cut += len(self.partial) - MAX_LINE_CHARS
            self.partial = self.partial[:MAX_LINE_CHARS]
        progress = self.partial[1:] if self.partial.startswith("\r") else None
        return finished, progress

    def rest(self) -> str:
        text = self._shorten(_visible(self.partial + self.decoder.decode(b"", final=True)))
        self.partial = ""
        self.redrawn = False
        return text

    def _shorten(self, line: str) -> str:
        """The line itself, or its head and a pointer to the log (the first cut is taken)."""
        cut = self.cut + max(0, len(line) - MAX_LINE_CHARS)
        self.cut = 0
        if not cut:
            return line
        return f"{line[:MAX_LINE_CHARS]} ... [{cut} more characters; full log: {self.log_path}]"


def _visible(line: str) -> str:
    """What a terminal shows of a line redrawn with carriage returns: its last state."""
    states = [state for state in line.split("\r") if state]
    return states[-1] if states else ""


class _Bucket:
    def __init__(self) -> None:
        self.tokens = float(BURST_LINES)
        self.stamp = time.monotonic()
        self.dropped = 0
        self.reported = self.stamp

    def take(self, cost: int) -> bool:
        now = time.monotonic()
        self.tokens = min(BURST_LINES, self.tokens + (now - self.stamp) * RATE_LINES)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        self.dropped += 1
        return False


class OutputRouter:
    """Routes every rank's output for one World; ``begin_call`` binds it to a call."""

    def __init__(self, log_dir: str, sink_factory: Callable[[], Sink]) -> None:
        self._log_dir = log_dir
        self._sink_factory = sink_factory
        self._sink: Sink | None = None  # None between calls: log only
        self._grouper: _Grouper | None = None  # None: every line at once, as its rank's
        self._shown: Callable[[int], bool] = lambda rank: False
        self._assemblers: dict[tuple[int, str], _Assembler] = {}
        self._buckets: dict[int, _Bucket] = {}
        self._tails: dict[int, deque[str]] = {}
        self._logs: dict[int, IO[bytes]] = {}
        # Per stream, the end of the last write that is not a whole line yet: a rank's log
        # gets its two streams line by line, so one never cuts a line of the other (print
        # writes a line's text and its newline apart).
        self._unlogged: dict[tuple[int, str], bytes] = {}

    @property
    def log_dir(self) -> str:
        return self._log_dir

    def log_path(self, rank: int) -> str:
        return os.path.join(self._log_dir, f"rank-{rank}.log")

    def written_log(self, rank: int) -> str | None:
        """The rank's log, if it has written anything (the file is made on first output)."""
        path = self.log_path(rank)
        return path if os.path.exists(path) else None

    def keep(self) -> None:
        """A call of this World failed: its logs stay until the process exits."""
        _kept_log_dirs.add(self._log_dir)

    def begin_call(self, shown: Callable[[int], bool]) -> None:
        # Lines left unfinished between calls go to the log: this call's cell is not theirs.
        for rank in {rank for rank, _ in self._assemblers}:
            self.finish(rank)
        self._sink = self._sink_factory()
        self._shown = shown
        self._buckets.clear()
        switch = os.environ.get(GROUP_SWITCH, "1").strip().lower()
        self._grouper = None if switch in ("0", "false", "no", "off") else _Grouper()

    def end_call(self) -> None:
        """Show what the call left without a newline, report drops, and unbind the sink."""
        for rank, _ in list(self._assemblers):
            self.finish(rank)
        self.release_held()
        for rank in sorted(self._buckets):
            self._report_drops(rank, final=True)
        self.flush()
        self._sink = None
        self._grouper = None

    def feed(self, rank: int, stream: str, data: bytes) -> None:
        self._write_log(rank, stream, data)
        assembler = self._assemblers.get((rank, stream))
        if assembler is None:
            assembler = self._assemblers[(rank, stream)] = _Assembler(self.log_path(rank))
        finishes_redraw = assembler.redrawn  # the first line to end is the redrawn one
        lines, progress = assembler.feed(data)
        for line in lines:
            self._line(rank, stream, line, finishes_redraw)
            finishes_redraw = False
        if progress is not None and self._sink is not None and self._shown(rank):
            self.release_held()  # the lines printed before the bar stay above it
            self._sink.progress(rank, stream, progress)

    def finish(self, rank: int) -> None:
        """The rank is done for now (call over) or gone: show its unfinished lines."""
        for (owner, stream), assembler in self._assemblers.items():
            if owner == rank and (assembler.partial or assembler.redrawn):
                redrawn = assembler.redrawn
                self._line(rank, stream, assembler.rest(), redrawn)
        for owner, stream in list(self._unlogged):
            if owner == rank:  # closed in the log as on the screen
                self._log(rank).write(self._unlogged.pop((owner, stream)) + b"\n")
        log = self._logs.get(rank)
        if log is not None:
            log.flush()

    def due(self) -> float | None:
        """When the supervisor must call flush() even if no rank writes anything new."""
        if self._sink is None:
            return None
        held = None if self._grouper is None else self._grouper.due()
        return min((t for t in (self._sink.due(), held) if t is not None), default=None)

    def tail(self, rank: int) -> list[str]:
        return list(self._tails.get(rank, ()))

    def release_held(self) -> None:
        """Show now every line held back for grouping (before a prompt, at the call's end)."""
        if self._sink is not None and self._grouper is not None:
            self._grouper.release(self._sink, everything=True)

    def note(self, rank: int, text: str) -> None:
        """A line of ranks' own about ``rank``, in the call's output, after what it printed."""
        if self._sink is not None:
            self.release_held()
            self._sink.note(rank, text)

    def flush(self) -> None:
        if self._sink is not None:
            if self._grouper is not None:
                self._grouper.release(self._sink)
            for rank in self._buckets:
                self._report_drops(rank, final=False)
            self._sink.flush()

    def close(self) -> None:
        for rank in {rank for rank, _ in self._unlogged}:
            self.finish(rank)
        for log in self._logs.values():
            log.close()
        self._logs.clear()
        _retire_log_dir(self._log_dir)

    def _line(self, rank: int, stream: str, text: str, finishes_redraw: bool = False) -> None:
        self._tails.setdefault(rank, deque(maxlen=TAIL_LINES)).append(text)
        if self._sink is None or not self._shown(rank):
            return
        bucket = self._buckets.setdefault(rank, _Bucket())
        # The final state of a redrawn line (a finished bar) replaces its display and adds
        # no line: a flood beside the bar must not leave it stuck short of 100%.
        if finishes_redraw:
            self.release_held()
            self._sink.line(rank, stream, text)
        elif bucket.take(1 + len(text) // CHARS_PER_LINE):
            if self._grouper is not None:
                self._grouper.add(rank, stream, text)
            else:
                self._sink.line(rank, stream, text)

    def _report_drops(self, rank: int, final: bool) -> None:
        bucket = self._buckets[rank]
        now = time.monotonic()
        if not bucket.dropped or (not final and now - bucket.reported < DROP_REPORT_INTERVAL):
            return
        assert self._sink is not None
        self.release_held()
        self._sink.note(rank, f"... {bucket.dropped} lines not shown (more than"
                        f" {RATE_LINES:g} a second); full log: {self.log_path(rank)}")
        bucket.dropped = 0
        bucket.reported = now

    def _write_log(self, rank: int, stream: str, data: bytes) -> None:
        held = self._unlogged.pop((rank, stream), b"") + data
        # Whole lines now; the rest when its newline comes (or once it is too long to hold).
        end = len(held) if len(held) > LOG_HOLD_BYTES else held.rfind(b"\n") + 1
        if end:
            self._log(rank).write(held[:end])
        if end < len(held):
            self._unlogged[(rank, stream)] = held[end:]

    def _log(self, rank: int) -> IO[bytes]:
        log = self._logs.get(rank)
        if log is None:
            log = self._logs[rank] = _runtime_dir.open_log(self.log_path(rank))
        return log


_retired_log_dirs: deque[str] = deque()  # of closed Worlds, oldest first
_kept_log_dirs: set[str] = set()  # of Worlds with a failed call: kept until exit
_log_numbers = itertools.count(1)


def new_log_dir() -> str:
    """A folder for one World's rank logs. It stays while its World is open; after that,
    this process keeps those of the last KEEP_LOG_DIRS closed Worlds, and those of failed
    calls, until it exits (see ``_runtime_dir``).

    The logs must outlive a one-shot call (a flood's summary, an error, points at them),
    so they are removed when newer Worlds push them out and at exit, not at close.
    """
    return _runtime_dir.new_dir(f"world-{next(_log_numbers)}-")


def _retire_log_dir(path: str) -> None:
    """The World writing to ``path`` has closed: it may now be pushed out by newer ones
    (never before: its ranks would lose their log mid-call)."""
    if path in _retired_log_dirs:
        return  # closed twice
    _retired_log_dirs.append(path)
    while len(_retired_log_dirs) > KEEP_LOG_DIRS:
        old = _retired_log_dirs.popleft()
        if old not in _kept_log_dirs:
            shutil.rmtree(old, ignore_errors=True)

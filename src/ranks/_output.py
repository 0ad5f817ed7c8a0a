"""What the ranks print, labelled by rank, into the kernel's own stdout and stderr.

Bytes arrive from each rank's fd 1 and fd 2 pipes (read by the supervisor in the thread
that made the call, so ipykernel files them under the calling cell). Here they become
lines: decoded incrementally (a UTF-8 character may be split across reads), labelled
``[rank N]``, written to ``sys.stdout`` or ``sys.stderr`` as they came. A carriage return
(a progress bar redrawing) keeps only the latest state of the line. The last lines of each
rank are kept for the error message when a rank dies.
"""

from __future__ import annotations

import codecs
import sys
from collections import deque
from collections.abc import Callable

TAIL_LINES = 30


class _Stream:
    def __init__(self) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.partial = ""


class OutputRouter:
    """Turns the ranks' output bytes into labelled lines; keeps each rank's last lines."""

    def __init__(self, shown: Callable[[int], bool]) -> None:
        self._shown = shown
        self._streams: dict[tuple[int, str], _Stream] = {}
        self._tails: dict[int, deque[str]] = {}

    def feed(self, rank: int, stream: str, data: bytes) -> None:
        state = self._streams.setdefault((rank, stream), _Stream())
        text = state.partial + state.decoder.decode(data)
        *lines, state.partial = text.split("\n")
        for line in lines:
            self._emit(rank, stream, line)

    def finish(self, rank: int) -> None:
        """The rank is done (or gone): show what it left without a final newline."""
        for (owner, stream), state in self._streams.items():
            if owner != rank:
                continue
            rest = state.partial + state.decoder.decode(b"", final=True)
            state.partial = ""
            if rest:
                self._emit(rank, stream, rest)

    def tail(self, rank: int) -> list[str]:
        return list(self._tails.get(rank, ()))

    def _emit(self, rank: int, stream: str, line: str) -> None:
        line = line.rstrip("\r").rsplit("\r", 1)[-1]  # what a terminal shows after redraws
        self._tails.setdefault(rank, deque(maxlen=TAIL_LINES)).append(line)
        if not self._shown(rank):
            return
        target = sys.stdout if stream == "stdout" else sys.stderr
        target.write(f"[rank {rank}] {line}\n")

    def flush(self) -> None:
        """Called after each batch of reads, so a flood is flushed in batches, not per line."""
        for target in (sys.stdout, sys.stderr):
            try:
                target.flush()
            except (OSError, ValueError):
                pass

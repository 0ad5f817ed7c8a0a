"""The IPython extension: ``%load_ext ranks``, then ``%ranks ...`` and ``%%ranks`` cells.

One World per kernel lives in the extension's state, made by ``%ranks start`` and used by
every other magic:

    %ranks start [-n N] [--gpus 0,1] [--torch-dist]   start the World
    %%ranks [--rank R ...] [--timeout S]             run the cell on (some of) its ranks
    %ranks push a b                                  send kernel variables to every rank
    x = %ranks pull name [--rank R]                  values from the ranks
    %ranks status                                    rank, pid, device, GPU memory, state
    %ranks debug [--rank R]                          pdb post-mortem where a rank raised
    %ranks restart                                   a new World with the same arguments
    %ranks stop                                      close it

The World is a plain :class:`ranks.World`; the magics only parse arguments and show
results, so everything they do is also available from Python.
"""

from __future__ import annotations

import argparse
import shlex
from typing import Any

from ._errors import RanksError
from ._world import RankStatus, World


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # raise instead of exiting the kernel
        raise RanksError(f"{self.prog}: {message}\n{self.format_usage()}")


def _start_parser() -> _Parser:
    parser = _Parser(prog="%ranks start", add_help=False)
    parser.add_argument("-n", type=int, default=None, help="number of CPU ranks")
    parser.add_argument("--gpus", type=_gpu_list, default=None, help="GPU ids, e.g. 0,1")
    parser.add_argument("--torch-dist", action="store_true", help="create the process group")
    return parser


def _gpu_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


class StatusTable:
    """``%ranks status``: shown as a table in a notebook and as text elsewhere."""

    COLUMNS = ("rank", "pid", "device", "GPU memory", "state")

    def __init__(self, rows: list[RankStatus]) -> None:
        self.rows = rows

    def _cells(self) -> list[tuple[str, ...]]:
        return [
            (str(r.rank), str(r.pid), r.device,
             "-" if r.gpu_memory_mib is None else f"{r.gpu_memory_mib} MiB", r.state)
            for r in self.rows
        ]

    def __repr__(self) -> str:
        table = [self.COLUMNS, *self._cells()]
        widths = [max(len(row[i]) for row in table) for i in range(len(self.COLUMNS))]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip()
            for row in table
        )

    def _repr_html_(self) -> str:
        from html import escape

        head = "".join(f"<th>{escape(c)}</th>" for c in self.COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>"
            for row in self._cells()
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


class RanksMagics:
    """Holds the kernel's World; registered on the shell by :func:`register`."""

    def __init__(self, shell: Any) -> None:
        self.shell = shell
        self.world: World | None = None
        self._start_args: argparse.Namespace | None = None

    # --- %ranks -------------------------------------------------------------------------

    def line(self, line: str) -> Any:
        words = shlex.split(line)
        if not words:
            raise RanksError("usage: %ranks start|push|pull|status|restart|stop ...")
        command, rest = words[0], words[1:]
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            raise RanksError(f"unknown %ranks command {command!r}: use start, push, pull,"
                             " status, restart or stop")
        return handler(rest)

    def _cmd_start(self, args: list[str]) -> None:
        if self.world is not None and not self.world.closed:
            if self.world.broken is not None:
                raise RanksError(f"the running ranks are broken ({self.world.broken}):"
                                 " `%ranks restart` starts new ones")
            raise RanksError("ranks are already running: `%ranks stop` or `%ranks restart` first")
        options = _start_parser().parse_args(args)
        self.world = World(options.n, options.gpus, torch_dist=options.torch_dist)
        self._start_args = options

    def _cmd_restart(self, args: list[str]) -> None:
        if args:
            raise RanksError("%ranks restart takes no arguments (it reuses those of start)")
        if self._start_args is None:
            raise RanksError("nothing to restart: `%ranks start` first")
        if self.world is not None:
            self.world.close()
        options = self._start_args
        self.world = World(options.n, options.gpus, torch_dist=options.torch_dist)

    def _cmd_stop(self, args: list[str]) -> None:
        if self.world is not None:
            self.world.close()
        self.world = None

    def _cmd_status(self, args: list[str]) -> StatusTable:
        return StatusTable(self._world().status())

    def _cmd_push(self, names: list[str]) -> None:
        if not names:
            raise RanksError("usage: %ranks push NAME [NAME ...]")
        missing = [name for name in names if name not in self.shell.user_ns]
        if missing:
            raise NameError(f"%ranks push: {missing} not defined in the notebook")
        self._world().push(**{name: self.shell.user_ns[name] for name in names})

    def _cmd_pull(self, args: list[str]) -> Any:
        parser = _Parser(prog="%ranks pull", add_help=False)
        parser.add_argument("name")
        parser.add_argument("--rank", type=int, default=None)
        options = parser.parse_args(args)
        return self._world().pull(options.name, options.rank)

    def _cmd_debug(self, args: list[str]) -> None:
        parser = _Parser(prog="%ranks debug", add_help=False)
        parser.add_argument("--rank", type=int, default=None)
        options = parser.parse_args(args)
        self._world().debug(options.rank)

    # --- %%ranks ------------------------------------------------------------------------

    def cell(self, line: str, cell: str) -> None:
        parser = _Parser(prog="%%ranks", add_help=False)
        parser.add_argument("--rank", type=int, action="append", dest="ranks")
        parser.add_argument("--timeout", type=float, default=None)
        options = parser.parse_args(shlex.split(line))
        self._world().exec(cell, options.ranks, timeout=options.timeout)

    def _world(self) -> World:
        if self.world is None or self.world.closed:
            raise RanksError("no ranks are running: `%ranks start -n 2` (or --gpus 0,1) first")
        return self.world

    def close(self) -> None:
        if self.world is not None:
            self.world.close()
            self.world = None


_magics: RanksMagics | None = None


def register(shell: Any) -> None:
    global _magics
    if _magics is not None:
        return  # loaded twice: keep the World that runs
    _magics = RanksMagics(shell)
    shell.register_magic_function(_magics.line, "line", "ranks")
    shell.register_magic_function(_magics.cell, "cell", "ranks")
    # The warm template imports torch in the background while the user writes the next
    # cell, so the first launch does not pay for it.
    from ._template import prestart

    prestart()


def unregister(shell: Any) -> None:
    global _magics
    if _magics is not None:
        _magics.close()
        _magics = None

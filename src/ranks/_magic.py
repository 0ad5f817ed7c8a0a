"""The IPython extension: ``%load_ext ranks``, then ``%ranks ...`` and ``%%ranks`` cells.

One World per kernel lives in the extension's state, made by ``%ranks start`` and used by
every other magic:

    %ranks start [-n N] [--gpus 0,1] [--torch-dist]   start the World
    %%ranks [--rank R ...] [--timeout S]             run the cell on (some of) its ranks
    %ranks on / %ranks off                           every following cell runs on the ranks
    %ranks push a b                                  send kernel variables to every rank
    x = %ranks pull name [--rank R]                  values from the ranks
    %ranks status                                    rank, pid, device, GPU memory, state
    %ranks stacks                                    every rank's threads, identical ones once
    %ranks debug [--rank R]                          pdb post-mortem where a rank raised
    %ranks restart                                   a new World with the same arguments
    %ranks stop                                      close it

The World is a plain :class:`ranks.World`; the magics only parse arguments and show
results, so everything they do is also available from Python. A magic line may end in a
``# comment``, as a Python line may. A ``%%ranks`` cell reads the names it lacks from the
notebook (see ``_namespace``).

``%ranks on`` adds an input transformer (IPython's documented ``input_transformers_cleanup``
hook, which sees a cell before IPython turns its magics into calls): each run of Python
lines becomes one ``%%ranks`` call, while lines that start with ``%`` or ``!`` (or assign
one: ``x = %ranks pull x``) and cells that start with ``%%`` still run in the kernel. Only
unindented lines count: a magic inside an ``if`` or a ``for`` goes to the ranks with it.
"""

from __future__ import annotations

import argparse
import re
import shlex
from typing import Any

from ._errors import RanksError
from ._stacks import Stacks
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
        words = _words(line)
        if not words:
            raise RanksError("usage: %ranks start|push|pull|status|stacks|debug|on|off|restart|"
                             "stop ...")
        command, rest = words[0], words[1:]
        handler = getattr(self, f"_cmd_{command}", None)
        if handler is None:
            raise RanksError(f"unknown %ranks command {command!r}: use start, push, pull,"
                             " status, stacks, debug, on, off, restart or stop")
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
        self._cmd_off([])  # cells that would all fail: no ranks left to run them
        if self.world is not None:
            self.world.close()
        self.world = None

    def _cmd_status(self, args: list[str]) -> StatusTable:
        return StatusTable(self._world().status())

    def _cmd_stacks(self, args: list[str]) -> Stacks:
        # Works while a call of this World runs in another thread of the kernel: that is
        # how a notebook looks into a call that hangs.
        if args:
            raise RanksError("%ranks stacks takes no arguments")
        return self._world().stacks()

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
        options = parser.parse_args(_words(line))
        self._world()._exec(cell, options.ranks, options.timeout, self.shell.user_ns)

    # --- %ranks on / off ----------------------------------------------------------------

    def _cmd_on(self, args: list[str]) -> None:
        if args:
            raise RanksError("%ranks on takes no arguments")
        self._world()
        if _on_mode not in self.shell.input_transformers_cleanup:
            self.shell.input_transformers_cleanup.append(_on_mode)

    def _cmd_off(self, args: list[str]) -> None:
        if args:
            raise RanksError("%ranks off takes no arguments")
        while _on_mode in self.shell.input_transformers_cleanup:
            self.shell.input_transformers_cleanup.remove(_on_mode)

    def _world(self) -> World:
        if self.world is None or self.world.closed:
            raise RanksError("no ranks are running: `%ranks start -n 2` (or --gpus 0,1) first")
        return self.world

    def close(self) -> None:
        self._cmd_off([])
        if self.world is not None:
            self.world.close()
            self.world = None


def _words(line: str) -> list[str]:
    """A magic's arguments; a ``#`` outside quotes starts a comment, as in Python."""
    return shlex.split(line, comments=True)


# A line the kernel runs in `%ranks on` mode: a magic or shell escape, or an assignment of one.
_KERNEL_LINE = re.compile(r"(?:[\w.]+(?:\s*,\s*[\w.]+)*\s*=\s*)?[%!]")


def _on_mode(lines: list[str]) -> list[str]:
    """``%ranks on``: the cell's runs of Python lines, each as one ``%%ranks`` call."""
    first = next((line for line in lines if line.strip()), "")
    if first.lstrip().startswith("%%"):
        return lines  # a cell magic (%%ranks included) runs as itself
    out: list[str] = []
    python: list[str] = []

    def flush() -> None:
        source = "".join(python)
        if source.strip():
            out.append(f"get_ipython().run_cell_magic('ranks', '', {source!r})\n")
        python.clear()

    # IPython's own tokenizer for cells (it finds magics the same way): a line inside a
    # string or a bracket that happens to start with % is not a logical line's start.
    from IPython.core.inputtransformer2 import make_tokens_by_line

    starts = {tokens[0].start[0] - 1 for tokens in make_tokens_by_line(lines) if tokens}
    for number, line in enumerate(lines):
        if number in starts and _KERNEL_LINE.match(line):
            flush()
            out.append(line)
        else:
            python.append(line)
    flush()
    return out


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
    from ._start import prestart

    prestart()


def unregister(shell: Any) -> None:
    global _magics
    if _magics is not None:
        _magics.close()
        _magics = None

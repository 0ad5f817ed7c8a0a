"""Run a notebook top to bottom in a real Jupyter kernel and show its outputs in the terminal.

    python examples/run_notebook.py examples/ddp_demo.ipynb [--out executed.ipynb]

The kernel is an ipykernel running *this* interpreter (``sys.executable``), whatever
kernelspecs are installed elsewhere, so it sees the packages of the environment that runs
this script (``ranks`` and ``torch`` among them). It starts in the notebook's folder, as
Jupyter would start it. Each cell's source is shown, then its outputs as they arrive (the
ranks' labelled lines stream while a cell still runs), then how long it took.

Exit status: 0 when every cell ran, 1 when a cell raised or timed out (the executed
notebook, up to the failing cell, is still written to ``--out`` when given), 2 for bad
arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class TerminalClient(NotebookClient):
    """A NotebookClient that also prints each cell and its outputs as they arrive."""

    def __init__(self, *args: Any, color: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._color = color
        self._started = 0.0
        # nbclient's hooks (traitlets) are the documented way to hear about cell boundaries.
        self.on_cell_execute = self._cell_starts
        self.on_cell_executed = self._cell_done

    def create_kernel_manager(self) -> Any:
        km = super().create_kernel_manager()
        # The "python3" spec may come from another installation (a kernelspec on the data
        # path naming a bare "python"); the kernel must be this interpreter, which has ranks.
        spec = km.kernel_spec
        if spec is None:
            raise RuntimeError("no 'python3' kernelspec found: is ipykernel installed?")
        spec.argv[0] = sys.executable
        return km

    def _cell_starts(self, cell: Any, cell_index: int) -> None:
        self._started = time.monotonic()
        _write(sys.stdout, f"\n--- cell {cell_index} " + "-" * 60 + "\n")
        for line in cell.source.splitlines():
            _write(sys.stdout, f"  | {line}\n")
        _write(sys.stdout, "\n")

    def _cell_done(self, cell: Any, cell_index: int, execute_reply: Any) -> None:
        seconds = time.monotonic() - self._started
        status = execute_reply["content"].get("status", "?") if execute_reply else "?"
        _write(sys.stdout, f"--- cell {cell_index}: {status} in {seconds:.1f} s\n")

    def output(
        self, outs: list[Any], msg: dict[str, Any], display_id: str | None, cell_index: int
    ) -> Any:
        # Called by nbclient for every IOPub output message of the running cell, as it comes.
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            target = sys.stderr if content.get("name") == "stderr" else sys.stdout
            _write(target, content.get("text", ""))
        elif kind in ("execute_result", "display_data"):
            text = content.get("data", {}).get("text/plain")
            if text:
                _write(sys.stdout, text + "\n")
        elif kind == "error":
            traceback = "\n".join(content.get("traceback", []))
            _write(sys.stderr, (traceback if self._color else _ANSI.sub("", traceback)) + "\n")
        return super().output(outs, msg, display_id, cell_index)


def _write(stream: Any, text: str) -> None:
    stream.write(text)
    stream.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path)
    parser.add_argument("--out", type=Path, help="also write the executed notebook here")
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds one cell may take (default: 600)"
    )
    args = parser.parse_args(argv)
    if not args.notebook.is_file():
        parser.error(f"no such notebook: {args.notebook}")

    nb = nbformat.read(args.notebook, as_version=4)
    client = TerminalClient(
        nb,
        kernel_name="python3",
        timeout=int(args.timeout),
        resources={"metadata": {"path": str(args.notebook.resolve().parent)}},
        color=sys.stdout.isatty(),
    )
    started = time.monotonic()
    failed = False
    try:
        client.execute()
    except CellTimeoutError as error:
        print(f"\nFAILED: a cell ran past {args.timeout:.0f} s: {error}", file=sys.stderr)
        failed = True
    except CellExecutionError as error:
        name = getattr(error, "ename", type(error).__name__)
        print(f"\nFAILED: a cell raised {name} (its traceback is above)", file=sys.stderr)
        failed = True
    except DeadKernelError as error:
        print(f"\nFAILED: the kernel died: {error}", file=sys.stderr)
        failed = True
    finally:
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            nbformat.write(nb, args.out)
    seconds = time.monotonic() - started
    if failed:
        return 1
    print(
        f"\n{args.notebook}: all cells ran in {seconds:.1f} s"
        + (f"; executed notebook written to {args.out}" if args.out else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""docs/troubleshooting.md shows the real messages of ranks: each is produced here.

Every block of the page that follows a ``<!-- produced by tests/test_troubleshooting.py: NAME
-->`` line is the error that scenario NAME gives in a real kernel, as the cell shows it from
its exception line on (the rank's traceback above it is left out), with what changes from
run to run (pids, folders, seconds) replaced by placeholders. A message that changed fails
its test with the new text; ``RANKS_UPDATE_DOCS=1`` writes the new text into the page
instead (then read the diff: the advice beside a block may need to change with it). A block
whose last line is ``...`` shows the message's first lines only (a timeout's rank stacks
depend on where the ranks were).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from kernel import Kernel

PAGE = Path(__file__).resolve().parent.parent / "docs" / "troubleshooting.md"
_MARKER = "<!-- produced by tests/test_troubleshooting.py: "
_BLOCK = re.compile(re.escape(_MARKER) + r"(\S+) -->\n```text\n(.*?)^```$",
                    re.DOTALL | re.MULTILINE)

# What each scenario runs in the kernel (ranks imported): the last statement raises.
SCENARIOS = {
    "rank-raised": """
def step():
    return 1 / ranks.current().rank   # rank 0 divides by zero
ranks.run(step, n=2)
""",
    "rank-killed": """
import os, signal
def step():
    if ranks.current().rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)   # what the OOM killer does
ranks.run(step, n=2)
""",
    "rank-exited": """
def step():
    if ranks.current().rank == 1:
        print("giving up")
        raise SystemExit(3)
ranks.run(step, n=2)
""",
    "timeout": """
import time
def step():
    while True:
        time.sleep(0.1)
ranks.run(step, n=2, timeout=5)
""",
    "no-gpu": """
ranks.run(print)
""",
    "cannot-travel": """
import threading
lock = threading.Lock()
ranks.run(print, args=(lock,), n=2)
""",
    "world-broken": """
import os
w = ranks.World(n=2)
try:
    w.run(lambda: os._exit(1) if ranks.current().rank == 1 else None)
except ranks.RankCrashed:
    pass
try:
    w.run(print)
finally:
    w.close()
""",
    "world-closed": """
w = ranks.World(n=2)
w.close()
w.run(print)
""",
    "magic-not-started": """
%load_ext ranks
%ranks push lock
""",
}

# Run to run differences, in the order applied.
_VARYING = [
    (re.compile(r"pid \d+"), "pid <pid>"),
    (re.compile(r"(?<![\w.])/\S*/ranks-\d+/\S+"), "<log file>"),
    (re.compile(r"\b\d+\.\d+ s\b"), "<seconds> s"),
    (re.compile(r'File "[^"]+", line \d+'), 'File "<file>", line <line>'),
]


def shown_error(kernel: Kernel, code: str) -> str:
    """The error the cell shows, from its exception line on, with placeholders."""
    cell = kernel.execute(code, timeout=90)
    assert cell.error is not None, f"the scenario raised nothing:\n{code}\n{cell.stdout}"
    lines = cell.traceback.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"{cell.error['ename']}:")]
    assert starts, cell.traceback
    text = "\n".join(line.rstrip() for line in lines[starts[-1]:]).strip("\n")
    for pattern, placeholder in _VARYING:
        text = pattern.sub(placeholder, text)
    return text


def shows(block: str | None, produced: str) -> bool:
    """Whether the page's block is the produced message (or its start, before a ``...``)."""
    if block is None or not block.endswith("\n..."):
        return block == produced
    head = block.removesuffix("\n...").splitlines()
    return produced.splitlines()[:len(head)] == head


def page_blocks() -> dict[str, str]:
    return {name: text.rstrip("\n") for name, text in _BLOCK.findall(PAGE.read_text())}


def test_the_page_shows_every_scenario_and_nothing_else() -> None:
    assert sorted(page_blocks()) == sorted(SCENARIOS)
    assert PAGE.read_text().count(_MARKER) == len(SCENARIOS)  # none malformed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_the_page_shows_the_message_ranks_gives(kernel: Kernel, name: str) -> None:
    produced = shown_error(kernel, SCENARIOS[name])
    shown = page_blocks().get(name)
    if shows(shown, produced):
        return
    if os.environ.get("RANKS_UPDATE_DOCS") == "1" and shown is not None:
        page = PAGE.read_text()
        start = page.index(f"{_MARKER}{name} -->\n```text\n")
        start = page.index("\n", page.index("```text", start)) + 1
        end = page.index("\n```", start)
        PAGE.write_text(page[:start] + produced + page[end:])
        return
    pytest.fail(f"docs/troubleshooting.md, {name}: the page shows\n{shown}\n\nranks gives\n"
                f"{produced}\n\n(RANKS_UPDATE_DOCS=1 writes it into the page)")

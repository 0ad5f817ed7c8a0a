"""Rank progress bars in a real JupyterLab page: one line per rank, updated in place.

The IOPub tests (test_output.py) check the messages; this checks what a user sees. It
starts ``jupyter lab`` on 127.0.0.1 (token-protected, in a temporary folder holding one
notebook), drives headless Chromium through Playwright to open the notebook and run its
cell (``ranks.run`` on 2 ranks, each running a tqdm bar for a few seconds), and reads the
output area from the DOM twice while the bars move and once at the end: exactly two bar
lines, labelled ``[rank 0]`` and ``[rank 1]``, whose text changes while the number of
lines stays put (not one line per redraw). The final screenshot is docs/output-progress.png
(refreshed with RANKS_UPDATE_SCREENSHOT=1).

The same page runs ``breakpoint()`` on rank 1: the cell's input box must show the prompt
labelled with the rank, ``p x`` typed there must show the value, and ``c`` must end the
cell. Its screenshot, taken mid-session, is docs/debugger.png (refreshed the same way).

Needs Chromium (Debian's ``chromium``; ``$RANKS_CHROMIUM`` names another binary), and the
``playwright`` and ``jupyterlab`` packages (the ``browser`` extra); the test skips, saying
which is missing, without them. CI installs all three (.ci/run) and sets
``RANKS_REQUIRE_BROWSER=1``, which turns that skip into a failure. Playwright's own browser
download (``playwright install``) is never used: the system's Chromium is.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.browser

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "output-progress.png"
DEBUGGER_SCREENSHOT = SCREENSHOT.with_name("debugger.png")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
CELL = """\
import ranks

def train():
    import time
    from tqdm import tqdm
    rank = ranks.current().rank
    print(f"rank {rank}: starting")
    for _ in tqdm(range(100), desc="epoch 1", mininterval=0.05):
        time.sleep(0.06)
    print(f"rank {rank}: done")
    return rank

ranks.run(train, n=2)"""
DEBUG_CELL = """\
import ranks

def work():
    x = 40 + ranks.current().rank
    if ranks.current().rank == 1:
        breakpoint()
    return x

ranks.run(work, n=2)"""
BAR = re.compile(r"^\[rank ([01])\] epoch 1: +\d+%\|")

# The output area of the notebook's cell: each output's MIME type and text.
READ_OUTPUTS = """() => {
    const area = document.querySelector('.jp-Notebook .jp-CodeCell .jp-OutputArea');
    if (!area) return [];
    return Array.from(area.querySelectorAll('.jp-OutputArea-output')).map(
        o => ({mime: o.getAttribute('data-mime-type'), text: o.innerText}));
}"""
PROMPT = "() => document.querySelector('.jp-Notebook .jp-CodeCell .jp-InputPrompt')?.innerText"


def missing(what: str) -> None:
    """Skip for want of ``what``; where the check is required (CI), fail instead."""
    if os.environ.get("RANKS_REQUIRE_BROWSER"):
        pytest.fail(f"RANKS_REQUIRE_BROWSER is set but {what}")
    pytest.skip(what)


@pytest.fixture
def chromium() -> str:
    """The Chromium binary (checked before JupyterLab starts: a skip should cost nothing)."""
    path = os.environ.get("RANKS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        missing("Chromium is not installed (apt-get install -y chromium; or set RANKS_CHROMIUM"
                " to a Chromium binary)")
    return path


@pytest.fixture
def sync_api() -> Any:
    return module("playwright.sync_api", "pip install -e '.[test,browser]'; not"
                  " `playwright install`: the test uses the system's Chromium")


def module(name: str, install: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError:
        missing(f"{name} is not installed ({install})")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A JupyterLab server in ``tmp_path`` (with the notebook): its base URL and token."""
    module("jupyterlab", "pip install -e '.[test,browser]'")
    root = tmp_path / "root"
    root.mkdir()
    for name, source in (("progress", CELL), ("debugger", DEBUG_CELL)):
        notebook = {
            "cells": [{"cell_type": "code", "execution_count": None, "id": name,
                       "metadata": {}, "outputs": [], "source": source}],
            "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
                                        "name": "python3"}},
            "nbformat": 4, "nbformat_minor": 5,
        }
        (root / f"{name}.ipynb").write_text(json.dumps(notebook))
    # No "Would you like to get notified about official Jupyter news?" over the cell.
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    for name in ("config", "data", "runtime"):  # nothing of the user's Jupyter set-up
        env[f"JUPYTER_{name.upper()}_DIR"] = str(tmp_path / f"jupyter-{name}")
    with open(tmp_path / "lab.log", "wb") as lab_log:  # the server holds its own copy
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
             "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             f"--LabServerApp.workspaces_dir={tmp_path / 'workspaces'}",
             f"--LabServerApp.user_settings_dir={tmp_path / 'settings'}",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=lab_log,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("jupyter lab did not start:\n"
                                         + (tmp_path / "lab.log").read_text()[-3000:]) from None
                time.sleep(0.2)
        yield base, token
    finally:
        # The server shuts its kernels down (and a kernel's ranks and template go with it).
        request = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST")
        try:
            if server.poll() is None:
                urllib.request.urlopen(request, timeout=10).close()
            server.wait(timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def bar_lines(outputs: list[dict[str, Any]]) -> list[str]:
    lines = [line for o in outputs for line in o["text"].splitlines() if line.strip()]
    return [line for line in lines if BAR.match(line)]


def all_lines(outputs: list[dict[str, Any]]) -> list[str]:
    return [line for o in outputs for line in o["text"].splitlines() if line.strip()]


@pytest.mark.timeout(120)
def test_rank_progress_bars_update_in_place_in_jupyterlab(
    sync_api: Any, chromium: str, lab: tuple[str, str], tmp_path: Path
) -> None:
    base, token = lab
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1000, "height": 700},
        )
        try:
            page = context.new_page()
            page.goto(f"{base}/lab/tree/progress.ipynb?token={token}")
            editor = page.locator(".jp-Notebook .jp-CodeCell .jp-InputArea-editor").first
            editor.wait_for(timeout=60_000)
            # Run the cell once its kernel is up: before that, Shift+Enter does not run it.
            page.get_by_text(re.compile(r"\| Idle$")).wait_for(timeout=60_000)
            editor.click()
            page.keyboard.press("Shift+Enter")

            # Mid-run: both bars are there and moving.
            deadline = time.monotonic() + 60
            while True:
                outputs = page.evaluate(READ_OUTPUTS)
                bars = bar_lines(outputs)
                if len(bars) == 2 and all(" 100%" not in b for b in bars) and any(
                        re.search(r"\s([1-9]\d?)%\|", b) for b in bars):
                    break
                assert time.monotonic() < deadline, f"no moving bars: {outputs}"
                time.sleep(0.1)
            cell = page.locator(".jp-Notebook .jp-CodeCell").first
            cell.screenshot(path=str(tmp_path / "mid-run.png"))
            time.sleep(0.8)
            later = page.evaluate(READ_OUTPUTS)
            assert bar_lines(later) != bars, "the bars did not move"
            assert len(bar_lines(later)) == 2 and len(later) == len(outputs), later
            labels = sorted(BAR.match(b)[1] for b in bar_lines(later))  # type: ignore[index]
            assert labels == ["0", "1"]

            # The end: the prompt shows an execution count, the bars their final state.
            deadline = time.monotonic() + 60
            while page.evaluate(PROMPT) != "[1]:":
                assert time.monotonic() < deadline, page.evaluate(READ_OUTPUTS)
                time.sleep(0.1)
            final = page.evaluate(READ_OUTPUTS)
            time.sleep(0.3)  # let the last frame paint
            cell.screenshot(path=str(tmp_path / "final.png"))
        finally:
            context.close()
    bars = bar_lines(final)
    assert len(bars) == 2, final
    assert all("100%" in b and "100/100" in b for b in bars), bars
    assert sorted(b[:8] for b in bars) == ["[rank 0]", "[rank 1]"]
    # Two bars, two prints per rank and the result: 7 lines, not hundreds of redraws.
    lines = all_lines(final)
    assert len(lines) == 7, lines
    for rank in (0, 1):
        for what in ("starting", "done"):
            assert f"[rank {rank}] rank {rank}: {what}" in lines
    assert "[0, 1]" in lines
    # The screenshot in docs/ is refreshed on request only, so a test run leaves the
    # checkout as it was.
    if os.environ.get("RANKS_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(tmp_path / "final.png", SCREENSHOT)


STDIN = ".jp-Notebook .jp-CodeCell .jp-Stdin"


@pytest.mark.timeout(120)
def test_breakpoint_on_a_rank_is_answered_in_the_cells_input_box(
    sync_api: Any, chromium: str, lab: tuple[str, str], tmp_path: Path
) -> None:
    base, token = lab
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1000, "height": 700},
        )
        try:
            page = context.new_page()
            page.goto(f"{base}/lab/tree/debugger.ipynb?token={token}")
            editor = page.locator(".jp-Notebook .jp-CodeCell .jp-InputArea-editor").first
            editor.wait_for(timeout=60_000)
            page.get_by_text(re.compile(r"\| Idle$")).wait_for(timeout=60_000)
            editor.click()
            page.keyboard.press("Shift+Enter")

            box = page.locator(f"{STDIN} input.jp-Stdin-input").last
            box.wait_for(timeout=60_000)
            prompt = page.locator(f"{STDIN} .jp-Stdin-prompt").last.inner_text()
            listing = all_lines(page.evaluate(READ_OUTPUTS))
            box.fill("p x")
            box.press("Enter")
            # The value, then the next prompt (a new input box) for the next command.
            deadline = time.monotonic() + 30
            while "[rank 1] 41" not in all_lines(page.evaluate(READ_OUTPUTS)) or (
                    page.locator(f"{STDIN} input.jp-Stdin-input").count() == 0):
                assert time.monotonic() < deadline, page.evaluate(READ_OUTPUTS)
                time.sleep(0.1)
            time.sleep(0.3)  # let the last frame paint
            cell = page.locator(".jp-Notebook .jp-CodeCell").first
            cell.screenshot(path=str(tmp_path / "debugger.png"))
            box = page.locator(f"{STDIN} input.jp-Stdin-input").last
            box.fill("c")
            box.press("Enter")
            deadline = time.monotonic() + 60
            while page.evaluate(PROMPT) != "[1]:":
                assert time.monotonic() < deadline, page.evaluate(READ_OUTPUTS)
                time.sleep(0.1)
            final = all_lines(page.evaluate(READ_OUTPUTS))
        finally:
            context.close()
    assert prompt.strip() == "[rank 1] (Pdb)", prompt
    assert "[rank 1] -> return x" in listing, listing  # the listing came before the box
    assert "[40, 41]" in final, final
    if os.environ.get("RANKS_UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(tmp_path / "debugger.png", DEBUGGER_SCREENSHOT)

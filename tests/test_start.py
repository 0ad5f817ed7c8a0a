"""The chooser of the start method (``ranks._start``): what ``RANKS_START_METHOD`` picks.

That every method works is shown by the modules that run once per start method
(``START_METHODS``, see conftest.py).
"""

from __future__ import annotations

import logging
import sys

import pytest

from ranks._start import START_METHOD_VARIABLE, start_method

DEFAULT = "template" if sys.platform.startswith("linux") else "portable"


@pytest.mark.parametrize(("chosen", "method"), [
    ("", DEFAULT), ("template", DEFAULT), (" Portable ", "portable"), ("portable", "portable"),
])
def test_the_variable_picks_the_start_method(
    chosen: str, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(START_METHOD_VARIABLE, chosen)
    assert start_method() == method


@pytest.mark.skipif(sys.platform == "win32", reason="spawn needs POSIX")
def test_spawn_is_taken_where_posix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(START_METHOD_VARIABLE, "spawn")
    assert start_method() == "spawn"


def test_an_unknown_method_falls_back_to_the_default_and_says_so(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(START_METHOD_VARIABLE, "forkserver")
    with caplog.at_level(logging.WARNING, logger="ranks"):
        assert start_method() == DEFAULT
    assert "'forkserver' is not 'template', 'spawn' or 'portable'" in caplog.text

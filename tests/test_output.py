"""Live rank output in the calling cell, checked on the raw IOPub messages of a real kernel.

What a rank writes to its fds 1 and 2 (``print``, ``sys.stderr``, ``os.write``, C's stdio)
must reach the calling cell while the call runs, labelled ``[rank R]``, on the stream it was
written to; progress bars must become one live display per rank and stream; a flood must be
cut and summarised with the path of the full log; a crash must not lose the last lines.

Output belongs to the call that was running when it was written. What a rank writes while
no call runs (a background thread of a World's rank, between two cells) belongs to no cell:
it goes to the rank's log only (``World.log_path``) and is never shown in a later cell.
File descriptors are per process, so a background thread's lines written *while* a later
call runs are that call's output like any other.

Each message the client receives carries ``msg["arrived"]`` (``time.time()`` in this
process), which is how "live" is checked: a line's message must arrive long before the
call ends, not in a burst at the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import cell
from kernel import WINDOWS_KERNEL, Cell, Kernel, host_path

from ranks._output import BURST_LINES, RATE_LINES, OutputRouter, TerminalSink


def stream_lines(shown: Cell, name: str) -> list[tuple[str, float]]:
    """Every line of one stream of a cell, with the arrival time of the message ending it."""
    lines: list[tuple[str, float]] = []
    partial = ""
    for msg in shown.messages:
        if msg["msg_type"] != "stream" or msg["content"]["name"] != name:
            continue
        *done, partial = (partial + msg["content"]["text"]).split("\n")
        lines += [(line, msg["arrived"]) for line in done]
    if partial:
        lines.append((partial, shown.messages[-1]["arrived"]))
    return lines


def texts(shown: Cell, name: str) -> list[str]:
    return [line for line, _ in stream_lines(shown, name)]


def ended(shown: Cell) -> float:
    """When the client learnt that the cell was over (its idle status message)."""
    return float(shown.messages[-1]["arrived"])


def displays(shown: Cell) -> list[dict[str, Any]]:
    kinds = ("display_data", "update_display_data")
    return [m for m in shown.messages if m["msg_type"] in kinds]


@pytest.fixture(scope="module")
def nb(kernel: Kernel) -> Kernel:
    cell(kernel, C_STDIO)
    return kernel


# The C library's stdio as native code in a rank uses it: libc, or on Windows the UCRT
# (which exports puts but not printf).
C_STDIO = """
    import os, sys, time, ranks

    def c_stdio():
        import ctypes, os
        return ctypes.CDLL(None) if os.name == "posix" else ctypes.CDLL("ucrtbase")
"""


# --- every kind of write, live, labelled, on its own stream ----------------------------------

EVERY_KIND = """
    def every_kind():
        import ctypes, os, sys, time
        rank = ranks.current().rank
        libc = c_stdio()
        print(f"python print at {time.time()!r}")
        os.write(1, b"raw os.write on fd 1\\n")
        print(f"to sys.stderr from {rank}", file=sys.stderr)
        os.write(2, b"raw os.write on fd 2\\n")
        libc.puts(f"c-level printf {rank}".encode())
        libc.puts(b"c-level puts")
        time.sleep(2)
        print("after the sleep")
        return rank
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["template", "spawn", "portable"])
def test_every_kind_of_write_streams_live_labelled_on_its_stream(
    nb: Kernel, start_method: str
) -> None:
    cell(nb, EVERY_KIND)
    shown = cell(nb, f"""
        os.environ["RANKS_START_METHOD"] = {start_method!r}
        try:
            result = ranks.run(every_kind, n=2)
        finally:
            del os.environ["RANKS_START_METHOD"]
        result
    """)
    assert shown.result == "[0, 1]"
    out, err = dict(stream_lines(shown, "stdout")), dict(stream_lines(shown, "stderr"))
    for rank in (0, 1):
        label = f"[rank {rank}] "
        printed = [line for line in out if line.startswith(label + "python print at ")]
        assert len(printed) == 1, out
        wrote_at = float(printed[0].rsplit(" ", 1)[1])
        # Live: well under a second behind the rank's write (the same machine's clock).
        assert out[printed[0]] - wrote_at < 0.5, (out[printed[0]], wrote_at)
        live = [label + "raw os.write on fd 1", label + f"c-level printf {rank}",
                label + "c-level puts"]
        for line in live:
            assert line in out, (line, out)
            # Written before a 2 s sleep: it must be in the cell long before the call ends.
            assert ended(shown) - out[line] > 1.5, (line, ended(shown) - out[line])
        assert label + "after the sleep" in out
        for line in (label + f"to sys.stderr from {rank}", label + "raw os.write on fd 2"):
            assert line in err, (line, err)
            assert line not in out
            assert ended(shown) - err[line] > 1.5, line
        assert label + "raw os.write on fd 1" not in err
    assert shown.stdout.count("python print at") == 2  # each line once, nothing doubled


@pytest.mark.timeout(30)
def test_partial_line_shown_when_completed_or_when_the_call_ends(nb: Kernel) -> None:
    shown = cell(nb, """
        def partial():
            import sys, time
            sys.stdout.write("half a line ")
            sys.stdout.flush()
            time.sleep(1)
            sys.stdout.write("and the other half\\n")
            sys.stdout.write("never finished")
        ranks.run(partial, n=2)
    """)
    for rank in (0, 1):
        assert f"[rank {rank}] half a line and the other half" in texts(shown, "stdout")
        assert f"[rank {rank}] never finished" in texts(shown, "stdout")
    assert "half a line \n" not in shown.stdout  # not shown early as a line of its own


@pytest.mark.timeout(30)
def test_lines_of_one_rank_stay_in_order(nb: Kernel) -> None:
    shown = cell(nb, """
        def numbered():
            import ctypes, os, time
            libc = c_stdio()
            for i in range(600):  # under the rate limit's burst: every line is shown
                if i % 3 == 0:
                    print(f"n {i}")
                elif i % 3 == 1:
                    os.write(1, f"n {i}\\n".encode())
                else:
                    libc.puts(f"n {i}".encode())
                if i % 100 == 0:
                    time.sleep(0.05)  # spread over many reads of the pipe
        ranks.run(numbered, n=2)
    """)
    for rank in (0, 1):
        label = f"[rank {rank}] n "
        numbers = [int(line[len(label):]) for line in texts(shown, "stdout")
                   if line.startswith(label)]
        assert numbers == list(range(600))


# --- progress bars -----------------------------------------------------------------------------

TQDM_BAR = """
    def bar():
        import time
        from tqdm import tqdm
        print("before the bar")
        for _ in tqdm(range(2000), mininterval=0, miniters=1):  # 2000 redraws
            time.sleep(0.0005)
        print("after the bar")
        return ranks.current().rank
"""


@pytest.mark.timeout(60)
def test_tqdm_bar_is_one_updating_display_per_rank(nb: Kernel) -> None:
    shown = cell(nb, TQDM_BAR + "    ranks.run(bar, n=2)\n")
    assert shown.result == "[0, 1]"
    created = [m for m in displays(shown) if m["msg_type"] == "display_data"]
    assert len(created) == 2, [m["content"] for m in created]
    ids = {m["content"]["transient"]["display_id"] for m in created}
    assert len(ids) == 2
    by_id: dict[str, list[str]] = {i: [] for i in ids}
    for msg in displays(shown):
        by_id[msg["content"]["transient"]["display_id"]].append(
            msg["content"]["data"]["text/plain"])
    for states in by_id.values():
        label = states[0][: len("[rank 0]")]
        assert label in ("[rank 0]", "[rank 1]")
        assert all(state.startswith(label) for state in states)
        assert len(states) > 2  # updated in place while it ran...
        assert len(states) < 200  # ...but throttled, not once per redraw
        assert "100%" in states[-1] and "2000/2000" in states[-1], states[-1]
    labels = sorted(states[0][:8] for states in by_id.values())
    assert labels == ["[rank 0]", "[rank 1]"]
    # The bar never becomes stream lines: only the two prints of each rank are lines.
    lines = texts(shown, "stdout") + texts(shown, "stderr")
    assert sorted(lines) == sorted(
        f"[rank {r}] {t} the bar" for r in (0, 1) for t in ("before", "after"))


@pytest.mark.timeout(30)
def test_carriage_return_redraws_show_their_last_state(nb: Kernel) -> None:
    shown = cell(nb, """
        def redraw():
            import sys, time
            for i in range(300):
                sys.stdout.write(f"\\rstep {i}/299")
                sys.stdout.flush()
                time.sleep(0.002)
            # no newline at the end: the call ending finishes the line
        ranks.run(redraw, n=2)
    """)
    assert texts(shown, "stdout") == []
    finals = {}
    for msg in displays(shown):
        finals[msg["content"]["transient"]["display_id"]] = msg["content"]["data"]["text/plain"]
    assert sorted(finals.values()) == ["[rank 0] step 299/299", "[rank 1] step 299/299"]
    assert len(displays(shown)) < 100


@pytest.mark.timeout(30)
def test_windows_line_ends_cut_by_a_read_are_plain_lines(nb: Kernel) -> None:
    """"\\r\\n" (Windows' newline) arriving in two reads is a line, not a redraw."""
    shown = cell(nb, """
        def crlf():
            import os, time
            os.write(1, b"first half\\r")
            time.sleep(0.3)  # the kernel reads the two halves apart
            os.write(1, b"\\nsecond line\\r\\n")
        ranks.run(crlf, n=1)
    """)
    assert texts(shown, "stdout") == ["[rank 0] first half", "[rank 0] second line"]
    assert displays(shown) == []


@pytest.mark.timeout(30)
def test_a_redraw_is_shown_live_also_when_the_rank_then_goes_quiet(nb: Kernel) -> None:
    shown = cell(nb, """
        def quiet_after_redraws():
            import sys, time
            for state in ("first state", "second state"):  # faster than the display redraws
                sys.stdout.write(f"\\r{state}")
                sys.stdout.flush()
                time.sleep(0.02)
            time.sleep(2)  # a long step: the display must not wait for the next write
            print()
        ranks.run(quiet_after_redraws, n=1)
    """)
    updates = [(m["arrived"], m["content"]["data"]["text/plain"]) for m in displays(shown)]
    second = [arrived for arrived, text in updates if text == "[rank 0] second state"]
    assert second, updates
    assert ended(shown) - second[0] > 1.5, (ended(shown) - second[0], updates)


# --- crashes -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_last_lines_before_a_crash_are_in_the_cell_and_the_error(nb: Kernel) -> None:
    shown = nb.execute(textwrap.dedent("""
        def dies():
            import ctypes, os, signal, sys, time
            if ranks.current().rank == 1:
                for i in range(5):
                    print(f"line {i} before the crash")
                c_stdio().puts(b"c-level last words")
                print("to stderr before the crash", file=sys.stderr)
                sys.stdout.write("a partial line")
                # No handler, no flush can run. Windows: TerminateProcess, exit code 9.
                os.kill(os.getpid(), getattr(signal, "SIGKILL", 9))
            time.sleep(30)
        ranks.run(dies, n=2)
    """))
    assert shown.error is not None and shown.error["ename"] == "RankCrashed", shown.traceback
    expected = [f"line {i} before the crash" for i in range(5)]
    expected += ["c-level last words", "a partial line"]
    out = texts(shown, "stdout")
    for line in expected:
        assert f"[rank 1] {line}" in out, (line, out)
        assert f"    {line}" in shown.error["evalue"], shown.error["evalue"]
    assert "[rank 1] to stderr before the crash" in texts(shown, "stderr")
    assert ("exited with code 9" if WINDOWS_KERNEL else "SIGKILL") in shown.error["evalue"]


# --- floods ------------------------------------------------------------------------------------

DROPPED = re.compile(r"\[rank (\d+)\] \.\.\. (\d+) lines not shown .*full log: (\S+)$")


@pytest.mark.timeout(120)
def test_flood_is_cut_summarised_and_kept_whole_in_the_log(nb: Kernel) -> None:
    lines_per_rank = 300_000
    shown = cell(nb, f"""
        def flood():
            rank = ranks.current().rank
            for i in range({lines_per_rank}):
                print(f"rank {{rank}} flood line {{i}}")
            return rank
        ranks.run(flood, n=2)
    """, timeout=110)
    assert shown.result == "[0, 1]"
    assert shown.seconds < 60, shown.seconds
    shown_lines = texts(shown, "stdout")
    # Bounded, so the browser stays usable: the limiter's burst, then its rate (a slower
    # system, such as Windows under Wine, floods for longer and is shown more of it).
    allowed = 2 * (BURST_LINES + RATE_LINES * shown.seconds)
    assert len(shown_lines) <= min(allowed, 20_000), (len(shown_lines), shown.seconds)
    dropped = {0: 0, 1: 0}
    logs: dict[int, str] = {}
    for line in texts(shown, "stderr"):
        match = DROPPED.match(line)
        assert match, line
        rank = int(match[1])
        dropped[rank] += int(match[2])
        logs[rank] = match[3]
    for rank in (0, 1):
        label = f"[rank {rank}] "
        count = sum(line.startswith(label) for line in shown_lines)
        assert count + dropped[rank] == lines_per_rank, (count, dropped[rank])
        # The full log holds every line, in order.
        with open(host_path(logs[rank])) as log:
            logged = log.read().splitlines()
        assert len(logged) == lines_per_rank
        assert logged[0] == f"rank {rank} flood line 0"
        assert logged[-1] == f"rank {rank} flood line {lines_per_rank - 1}"
    # The kernel is responsive right after.
    assert cell(nb, "1 + 1").seconds < 2


@pytest.mark.timeout(120)
def test_a_bar_beside_a_flood_ends_at_100_percent_and_stays_a_bar(nb: Kernel) -> None:
    shown = cell(nb, """
        def noisy_training():
            from tqdm import tqdm
            for step in tqdm(range(50), mininterval=0):  # on stderr
                for i in range(3000):
                    print(f"log {step} {i}")  # on stdout: far over the limit
        ranks.run(noisy_training, n=2)
    """, timeout=110)
    finals: dict[str, str] = {}
    for msg in displays(shown):
        finals[msg["content"]["transient"]["display_id"]] = msg["content"]["data"]["text/plain"]
    assert len(finals) == 2, finals
    for text in finals.values():
        assert "100%" in text and "50/50" in text, text  # not a flood summary, not 98%
    summaries = texts(shown, "stderr")
    assert summaries and all(DROPPED.match(line) for line in summaries), summaries


@pytest.mark.timeout(120)
def test_one_huge_line_is_shown_cut_and_kept_whole_in_the_log(nb: Kernel) -> None:
    size = 20_000_000
    shown = cell(nb, f"""
        def huge():
            import sys
            sys.stdout.write("x" * {size})  # no newline for 20 MB
            sys.stdout.write("y\\n")
            print("next line")
        with ranks.World(n=1) as w:
            w.run(huge)
            huge_log = w.log_path(0)
    """, timeout=110)
    assert shown.seconds < 30, shown.seconds
    assert len(shown.stdout) < 100_000, len(shown.stdout)
    lines = texts(shown, "stdout")
    assert lines[0].startswith("[rank 0] xxxx") and "full log" in lines[0], lines[0][-300:]
    assert lines[1] == "[rank 0] next line"
    log_path = host_path(nb.value("huge_log"))
    newline = "\r\n" if WINDOWS_KERNEL else "\n"  # the log keeps the bytes the rank wrote
    assert os.path.getsize(log_path) == size + len(f"y{newline}next line{newline}")


# --- which cell the output goes to ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_all_output_of_a_call_is_in_its_cell_and_none_in_the_next(nb: Kernel) -> None:
    cell(nb, "w = ranks.World(n=2)")
    try:
        first = cell(nb, """
            def burst():
                import sys
                for i in range(800):
                    print(f"burst {i}")
                sys.stdout.write("burst partial")
            w.run(burst)
        """)
        # The next cell starts the moment the first one is idle.
        second = cell(nb, "w.run(lambda: print('second call'))")
    finally:
        cell(nb, "w.close()")
    for rank in (0, 1):
        lines = [t for t in texts(first, "stdout") if t.startswith(f"[rank {rank}] ")]
        assert lines == [f"[rank {rank}] burst {i}" for i in range(800)] + [
            f"[rank {rank}] burst partial"]
    assert sorted(texts(second, "stdout")) == ["[rank 0] second call", "[rank 1] second call"]
    assert second.stderr == ""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("next_cell", ["an unrelated call", "closing the World"])
def test_background_output_between_calls_goes_to_the_log_only(
    nb: Kernel, tmp_path: Path, next_cell: str
) -> None:
    done = tmp_path / "background-done"
    cell(nb, "w = ranks.World(n=2)")
    try:
        first = cell(nb, f"""
            def start_chatter():
                import ctypes, os, sys, threading, time
                rank = ranks.current().rank

                def chatter():
                    time.sleep(0.3)  # the call has returned by now
                    for i in range(300):
                        print(f"background {{i}}")
                    c_stdio().puts(b"background c-level")
                    print("background stderr", file=sys.stderr)
                    sys.stdout.write("background partial")
                    sys.stdout.flush()
                    open({str(done)!r} + str(rank), "w").close()

                threading.Thread(target=chatter, daemon=True).start()
                print("first call")
            w.run(start_chatter)
            logs = [w.log_path(0), w.log_path(1)]
        """)
        deadline = time.monotonic() + 20
        while not all(Path(f"{done}{r}").exists() for r in (0, 1)):
            assert time.monotonic() < deadline, "the background threads never finished"
            time.sleep(0.01)
        # Right away: what the threads wrote is still in the pipes, unread by the kernel.
        if next_cell == "an unrelated call":
            second = cell(nb, "w.run(lambda: print('unrelated call'))")
            expected = ["[rank 0] unrelated call", "[rank 1] unrelated call"]
        else:
            second = cell(nb, "w.close()")
            expected = []
        logs = nb.value("logs")
    finally:
        cell(nb, "w.close()")
    assert sorted(texts(first, "stdout")) == ["[rank 0] first call", "[rank 1] first call"]
    assert sorted(texts(second, "stdout")) == expected
    assert second.stderr == "" and first.stderr == ""
    for rank in (0, 1):
        logged = Path(host_path(logs[rank])).read_text()
        assert all(f"background {i}\n" in logged for i in range(300))
        assert "background c-level\n" in logged and "background stderr\n" in logged
        assert "background partial" in logged


# --- output= -----------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_output_picks_the_ranks_shown_and_the_rest_is_logged(nb: Kernel) -> None:
    cell(nb, """
        def hello():
            import sys
            rank = ranks.current().rank
            print(f"out of {rank}")
            print(f"err of {rank}", file=sys.stderr)
        w = ranks.World(n=3)
    """)
    try:
        picked = {
            repr(choice): cell(nb, f"w.run(hello, output={choice!r})")
            for choice in ("all", "rank0", "none", [0, 2], [1])
        }
        logs = nb.value("[open(w.log_path(r)).read() for r in range(3)]")
    finally:
        cell(nb, "w.close()")
    expected = {"'all'": [0, 1, 2], "'rank0'": [0], "'none'": [], "[0, 2]": [0, 2], "[1]": [1]}
    for choice, ranks_shown in expected.items():
        shown = picked[choice]
        assert sorted(texts(shown, "stdout")) == [f"[rank {r}] out of {r}" for r in ranks_shown]
        assert sorted(texts(shown, "stderr")) == [f"[rank {r}] err of {r}" for r in ranks_shown]
    for rank in range(3):  # every call, shown or not, is in the rank's log
        assert logs[rank].count(f"out of {rank}\n") == len(expected)
        assert logs[rank].count(f"err of {rank}\n") == len(expected)


def test_the_log_keeps_each_streams_lines_whole(tmp_path: Path) -> None:
    """print() writes a line's text and its newline apart; the other stream's line written
    in between must not land inside it in the rank's log. Unfinished lines are closed."""
    router = OutputRouter(str(tmp_path), TerminalSink)
    router.feed(0, "stdout", b"out of 0")
    router.feed(0, "stderr", b"err of 0\r\n")
    router.feed(0, "stdout", b"\r\nno newline")
    router.close()
    assert Path(router.log_path(0)).read_bytes() == b"err of 0\r\nout of 0\r\nno newline\n"


# --- independent of ipykernel's own capture of fds 1 and 2 -------------------------------------


@pytest.mark.timeout(120)
def test_works_without_ipykernels_fd_capture(tmp_path: Path) -> None:
    profile = tmp_path / "ipython" / "profile_default"
    profile.mkdir(parents=True)
    (profile / "ipython_kernel_config.py").write_text(
        "c.IPKernelApp.capture_fd_output = False\n")
    kernel = Kernel(str(tmp_path), env={"IPYTHONDIR": str(tmp_path / "ipython")})
    try:
        assert kernel.value(
            "__import__('ipykernel.kernelapp').kernelapp.IPKernelApp.instance()"
            ".capture_fd_output") is False
        cell(kernel, C_STDIO)
        cell(kernel, EVERY_KIND)
        shown = cell(kernel, "ranks.run(every_kind, n=2)")
    finally:
        kernel.shutdown()
    out, err = texts(shown, "stdout"), texts(shown, "stderr")
    for rank in (0, 1):
        for line in ("raw os.write on fd 1", f"c-level printf {rank}", "c-level puts",
                     "after the sleep"):
            assert f"[rank {rank}] {line}" in out
        assert f"[rank {rank}] raw os.write on fd 2" in err


# --- a plain script ----------------------------------------------------------------------------

SCRIPT = """
import ranks

def work():
    import ctypes, os, sys, time
    from tqdm import tqdm
    rank = ranks.current().rank
    print(f"print of {rank}")
    os.write(1, b"os.write\\n")
    ctypes.CDLL(None).puts(b"c-level puts")
    print(f"stderr of {rank}", file=sys.stderr)
    for _ in tqdm(range(100), mininterval=0):
        time.sleep(0.005)
    sys.stdout.write("unfinished")
    return rank

if __name__ == "__main__":
    print("result", ranks.run(work, n=2))
"""


@pytest.mark.timeout(60)
def test_plain_script_gets_labelled_lines_on_its_stdout_and_stderr(tmp_path: Path) -> None:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JPY_", "JUPYTER"))}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=50, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    out, err = done.stdout.splitlines(), done.stderr.splitlines()
    for rank in (0, 1):
        label = f"[rank {rank}] "
        for line in (f"print of {rank}", "os.write", "c-level puts", "unfinished"):
            assert label + line in out, (line, out)
        assert label + f"stderr of {rank}" in err
        # A bar stays readable: its final state, not one line per redraw.
        bar = [line for line in err if line.startswith(label) and "it/s" in line]
        assert 1 <= len(bar) <= 3, bar
        assert "100%" in bar[-1] and "100/100" in bar[-1]
    assert out[-1] == "result [0, 1]"
    assert "\r" not in done.stdout + done.stderr

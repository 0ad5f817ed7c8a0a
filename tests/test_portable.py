"""The portable start (``ranks._portable``): how ranks start on Windows, tested here.

The notebook, crash-table and World tests run on this path too (their ``START_METHODS``,
see conftest.py); the parametrized tests of test_output.py and
test_supervision_kernel.py run it too. Here are its own parts: the output relay's markers,
the loopback handshake, and ranks that never connect back. Real processes and sockets
throughout; the Win32 calls (job objects, process handles) cannot run on this system.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import wait
from pathlib import Path

import psutil
import pytest

import ranks
from ranks import _protocol
from ranks._placement import RankSpec
from ranks._portable import CALL_MARK, REPLY_MARK, PortableStart, RelayedOutput, output_mark
from ranks._protocol import Close, Init, Ready

TOKEN = "0123456789abcdef" * 2
MARK = output_mark(TOKEN, REPLY_MARK)
CALL = output_mark(TOKEN, CALL_MARK)


@pytest.fixture
def portable(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("RANKS_START_METHOD", "portable")
    yield


def read_to_end(stream: RelayedOutput, timeout: float = 10.0) -> bytes:
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        wait([stream.waitable], deadline - time.monotonic())  # type: ignore[list-item]
        data = stream.read(1 << 16)
        if data == b"":
            return received
        received += data or b""
    raise AssertionError(f"no end of stream after {timeout} s; got {received!r}")


@pytest.mark.timeout(60)
def test_relay_strips_its_markers_wherever_a_read_cuts_them() -> None:
    """Markers come out and are counted, also when a write boundary cuts one in two;
    look-alikes in the user's output (another token, a lone NUL) pass unchanged."""
    user_text = b"loss 0.5\n\0ranks:not-the-token\0\n\0"
    for cut in range(1, len(MARK)):
        read_end, write_end = os.pipe()
        stream = RelayedOutput(os.fdopen(read_end, "rb", buffering=0), "stdout", TOKEN)
        first = b"a line\n" + MARK[:cut]
        os.write(write_end, first)
        time.sleep(0.005)  # a separate read of each half, most of the time
        os.write(write_end, MARK[cut:] + user_text + MARK)
        os.close(write_end)
        assert read_to_end(stream) == b"a line\n" + user_text, cut
        assert stream.replies == 2, cut
        stream.settle(5)
        stream.close()


@pytest.mark.timeout(60)
def test_relay_holds_a_possible_marker_start_only_until_the_end() -> None:
    """Output that ends like the start of a marker is not lost: it comes at end of stream."""
    read_end, write_end = os.pipe()
    stream = RelayedOutput(os.fdopen(read_end, "rb", buffering=0), "stderr", TOKEN)
    os.write(write_end, b"done" + MARK[:5])
    os.close(write_end)
    assert read_to_end(stream) == b"done" + MARK[:5]
    assert stream.replies == 0
    stream.settle(5)
    stream.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("held", [True, False])
def test_a_read_ends_at_a_call_marker_only_when_asked(held: bool) -> None:
    """Held at the call (the kernel is about to bind output to the call's cell), a read
    returns what was written between calls, and the call's output with the next read.
    Not held, nothing stays behind in the stream where waiting on its socket misses it."""
    read_end, write_end = os.pipe()
    stream = RelayedOutput(os.fdopen(read_end, "rb", buffering=0), "stdout", TOKEN)
    stream.hold_at_call = held
    os.write(write_end, b"between calls\n" + CALL + b"the call's\n" + MARK)
    wait([stream.waitable], 10)  # type: ignore[list-item]
    time.sleep(0.1)  # all of it in the socket: one receive takes it
    if held:
        assert stream.read(1 << 16) == b"between calls\n"
        assert (stream.calls, stream.replies, stream.hold_at_call) == (1, 0, False)
        assert stream.read(1 << 16) == b"the call's\n"
    else:
        assert stream.read(1 << 16) == b"between calls\nthe call's\n"
    assert (stream.calls, stream.replies) == (1, 1)
    assert stream.read(1 << 16) is None  # nothing left behind
    os.close(write_end)
    assert read_to_end(stream) == b""
    stream.settle(5)
    stream.close()


def _init(tmp_path: Path) -> Init:
    return Init(rank=0, world_size=1, gpu=None, torch_dist=False, sys_path=tuple(sys.path),
                cwd=str(tmp_path), store_path=str(tmp_path / "store"))


@pytest.mark.timeout(60)
def test_a_stranger_on_the_port_is_turned_away(tmp_path: Path) -> None:
    """Whoever connects to the kernel's port without the token is dropped; the rank that
    has it connects after them and serves as usual."""
    start = PortableStart(RankSpec(0, 1, None), dict(os.environ), str(tmp_path),
                          str(tmp_path / "stacks"))
    port = start._listener.getsockname()[1]
    stranger = socket.create_connection(("127.0.0.1", port))
    stranger.sendall(b"f" * 32 + b"\n")
    rank = start.connect(time.monotonic() + 30)
    try:
        stranger.settimeout(10)
        assert stranger.recv(1) == b""  # closed by the kernel
        _protocol.send(rank.conn, _init(tmp_path))
        assert isinstance(_protocol.recv(rank.conn), Ready)
        _protocol.send(rank.conn, Close())
        assert wait([rank.sentinel], 30)
        assert rank.reap() == 0
    finally:
        stranger.close()
        rank.signal_tree(signal.SIGKILL)
        rank.release()


@pytest.mark.timeout(60)
def test_a_rank_that_never_connects_back_is_bounded_by_the_timeout(
    portable: None, tmp_path: Path
) -> None:
    """A rank stuck before it connects (here: a sitecustomize that sleeps) ends the call
    with RanksTimeout in time, and is killed (the leak check would see it)."""
    (tmp_path / "sitecustomize.py").write_text("import time\ntime.sleep(60)\n")
    started = time.monotonic()
    with pytest.raises(ranks.RanksTimeout):
        ranks.run(int, n=2, timeout=2, env={"PYTHONPATH": str(tmp_path)})
    assert time.monotonic() - started < 10


@pytest.mark.timeout(60)
def test_a_rank_that_dies_before_connecting_back_is_a_crash_with_its_last_words(
    portable: None, tmp_path: Path
) -> None:
    """An interpreter that cannot even start (a broken PYTHONHOME) is RankCrashed, with
    what it printed, rather than a hang."""
    with pytest.raises(ranks.RankCrashed) as raised:
        ranks.run(int, n=2, env={"PYTHONHOME": str(tmp_path / "nowhere")})
    message = str(raised.value)
    assert "exited with code 1" in message and "while starting" in message, message
    assert "Fatal Python error" in message, message  # its stderr, relayed to the end


ORPHAN_SCRIPT = """
import os, sys, ranks

def work():
    return os.getpid()

# Rank 1 sleeps in its sitecustomize before it connects back, so rank 0 waits in
# torch.distributed's rendezvous, before Ready, where no thread reads its channel.
ranks.run(work, n=2, torch_dist=True, env={"PYTHONPATH": sys.argv[1]})
"""


@pytest.mark.timeout(60)
@pytest.mark.kills_kernel
def test_ranks_starting_when_the_kernel_dies_end_too(tmp_path: Path) -> None:
    """POSIX, portable start (as on macOS): the kernel killed while a rank waits in the
    rendezvous and the other has not connected yet: both end within seconds."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, time\nif os.environ.get('RANK') == '1':\n    time.sleep(3)\n")
    script = tmp_path / "kernel.py"
    script.write_text(ORPHAN_SCRIPT)
    env = {**os.environ, "RANKS_START_METHOD": "portable"}
    kernel = subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env)
    try:
        deadline = time.monotonic() + 30
        ranks_seen: list[psutil.Process] = []
        while len(ranks_seen) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
            ranks_seen = [p for p in psutil.Process(kernel.pid).children()
                          if "ranks._worker" in " ".join(p.cmdline())]
        assert len(ranks_seen) == 2, ranks_seen
        time.sleep(1.0)  # rank 0 is in the rendezvous by now
        kernel.kill()
        kernel.wait()
        _, alive = psutil.wait_procs(ranks_seen, timeout=10)
        assert alive == [], alive
    finally:
        kernel.kill()
        kernel.wait()

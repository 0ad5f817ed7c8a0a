"""The rank side: the entry point of every rank process, and its command loop.

What one call does is ``_rank_call``'s (load, run in the namespace, reply), which a rank
hosted elsewhere reuses; here is the rest: how the rank boots for its start method (its
channel inherited or connected back, its lifelines), the control thread, the interrupt
handler, and the exit.

A rank is a fresh interpreter or a fork of the warm template (never a fork of the kernel).
Its life:

    watcher process --> fault handler --> Init (sys.path, cwd) --> pin GPU
      --> torch.distributed (if asked) --> Ready --> [Call -> Done | Failed]* --> Close --> exit

The main thread runs the user's code, so KeyboardInterrupt (the kernel forwarding an
interrupt as SIGINT) lands where the user expects it; the SIGINT handler also tells the
kernel it was reached (Interrupted), so a rank stuck in C code is told apart. A control
thread owns the channel: it queues commands for the main thread, sends those receipts, and
when the channel closes because the kernel died, ends the rank's whole tree (DataLoader
workers included). Independent of both threads, a watcher process forked first ends the
tree when the rank's parent dies (``_lifeline``), and the group when the rank itself dies.
On Linux the rank is the subreaper of what it starts, so a daemon that left its group is
still in its tree; multiprocessing's resource tracker goes last (``_descendants``).

On the portable start (Windows, macOS; see ``_portable``) the rank connects back instead of
inheriting its channel, the control thread also takes Interrupt (raising SIGINT in the
main thread) and DumpStacks, and the kernel is followed by a thread on POSIX (the watcher,
Linux only there, just ends the group once the rank is gone), by the rank's job object on
Windows.

fds 1 and 2 are pipes to the kernel, set up by the launcher; C's stdout is line-buffered
here (unbuffered on Windows) so output streams live.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import functools
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Any, NoReturn, TextIO

from . import _context, _dataplane, _protocol, _rank_call, _runtime_dir
from ._descendants import TRACKER_WAIT, adopt_orphans, end_processes
from ._lifeline import die_with_parent, watch_parent
from ._os import current
from ._protocol import (
    Call,
    Close,
    DebugInput,
    DebugPrompt,
    DumpStacks,
    Init,
    Interrupt,
    Interrupted,
    Ready,
)


def main(argv: list[str], parent_adopts: bool = False) -> None:
    """``argv``: the control socket's fd (or ``portable``), the parent's pid, the file for
    stack dumps. ``parent_adopts``: the parent (the template) ends what the rank leaves
    behind when it exits."""
    global _stacks_file, _parent_adopts
    _parent_adopts = parent_adopts
    parent_pid, stacks_path = int(argv[1]), argv[2]
    sys.argv = ["-c"]  # what user code sees: ours are not its arguments (as `python -c`)
    adopt_orphans()  # a daemon the user's code starts stays below the rank (_descendants)
    if argv[0] == "portable":
        conn = _boot_portable(parent_pid)
    else:
        conn = _boot_inherited(int(argv[0]), parent_pid)
    faulthandler.enable(file=2, all_threads=True)  # fd 2: the pipe to the kernel
    # Appending: the kernel empties the file before each dump, and the dump must then start
    # at its beginning, not at the offset the last one ended at.
    _stacks_file = open(stacks_path, "a")  # noqa: SIM115 - lives as long as the process
    if _output_marks is None:
        # SIGUSR1 dumps every thread's stack to a file the kernel reads on a timeout; the
        # dump happens in the signal handler, so it works while the main thread is stuck in
        # C code. (The portable start asks with DumpStacks, taken by the control thread.)
        faulthandler.register(signal.SIGUSR1, file=_stacks_file, all_threads=True)
    _line_buffer_c_stdio()

    global _folders
    _folders = _dataplane.Folders.of_this_rank()
    init = _protocol.recv(conn)
    assert isinstance(init, Init), init
    os.chdir(init.cwd)
    sys.path[:] = list(init.sys_path)
    _context._set_current(_context.RankInfo(init.rank, init.world_size, init.rank, init.gpu))

    try:
        _set_up_devices(init)
    except BaseException as error:
        during = "setting up (its GPU, torch.distributed)" if init.gpu is not None else (
            "setting up torch.distributed")
        try:
            failure = _rank_call.failure(None, error, during, skip=0)
        except SystemExit as request:
            _exit_as_asked(request)
        _flush_all()
        _protocol.send(conn, failure)
        _leave(1)
    # Before Ready: from then on the kernel may send SIGINT at any moment (a peer failed,
    # the kernel was interrupted), and Python's default handler would kill a rank that is
    # not yet in _serve with a KeyboardInterrupt traceback.
    global _interrupt_taken
    _interrupt_taken = socket.socketpair()  # not a pipe: Windows waits on sockets only
    _interrupt_taken[1].setblocking(False)
    signal.signal(signal.SIGINT, _on_interrupt)
    _flush_all()
    _protocol.send(conn, Ready(os.getpid()))

    _install_debugger(conn)
    commands: queue.Queue[_protocol.Message] = queue.Queue()
    threading.Thread(target=_read_commands, args=(conn, commands), daemon=True,
                     name="ranks-control").start()
    _serve(conn, commands)
    _tear_down()
    _leave(0)


def _boot_inherited(control_fd: int, parent_pid: int) -> Connection:
    """The template and spawn starts: the channel is an inherited fd; a pidfd on the
    parent, and the watcher process (Linux)."""
    parent_pidfd = watch_parent(parent_pid)
    _guard_descendants(parent_pidfd)  # before any thread starts: it forks
    if parent_pidfd is not None:
        os.close(parent_pidfd)
    os.set_inheritable(control_fd, False)  # programs the user starts must not hold it
    return Connection(control_fd)


def _boot_portable(parent_pid: int) -> Connection:
    """The portable start, as on Windows: connected back over loopback, no pidfd
    (``_portable``); output marked for the relay. On Linux a watcher still ends the rank's
    group once the rank is gone; on POSIX a thread follows the kernel."""
    global _output_marks
    _guard_descendants(None)  # before any thread starts: it forks
    from ._portable import CALL_MARK, REPLY_MARK, connect_back, output_mark

    conn, token = connect_back()
    _output_marks = (output_mark(token, REPLY_MARK), output_mark(token, CALL_MARK))
    if os.name == "posix":
        threading.Thread(target=_follow_parent, args=(parent_pid,), daemon=True,
                         name="ranks-lifeline").start()
    return conn


def _leave(status: int) -> NoReturn:
    """End the rank with ``os._exit``: interpreter teardown is skipped, as threads of
    libraries (NCCL, Gloo) can hang it. atexit handlers do not run then, so what the rank
    wrote to disk itself (the logs of a ``ranks.run`` it made) is removed here.

    Before it, what the rank started, but the watcher (which ends the rest once the rank is
    gone) and multiprocessing's resource tracker (which cleans up once the rank is gone: see
    _descendants). A parent that adopts what we leave (the template, a subreaper) ends all
    that itself, off the path of the kernel's wait for our exit."""
    _runtime_dir.remove_process_dir()
    if _parent_adopts or not end_processes(below=[os.getpid()], spare=_watcher):
        # Then the watcher has nothing to do once we are gone.
        for watcher in _watcher:
            with contextlib.suppress(OSError):
                os.kill(watcher, signal.SIGKILL)
    os._exit(status)


def _install_debugger(conn: Connection) -> None:
    """``breakpoint()`` in the user's code asks the kernel for its lines (``_rank_pdb``)."""
    from . import _rank_pdb

    def ask_kernel(prompt: DebugPrompt) -> None:
        global _interrupt_held
        _flush_all()  # what pdb printed (the listing) shows before the input box
        # Raised mid-frame, a KeyboardInterrupt would corrupt the channel: hold it till after.
        _interrupt_held = False
        try:
            _send(conn, prompt)
        finally:
            interrupted, _interrupt_held = _interrupt_held, None
        if interrupted:
            raise KeyboardInterrupt

    _rank_pdb.install(ask_kernel)


def _guard_descendants(parent_pidfd: int | None) -> None:
    """Fork a watcher that ends the rank's tree and group when the rank or its parent dies.

    The watcher is a single-threaded child of the rank, in a process group of its own (so
    that the rank's group is empty once the rank is gone), holding none of its fds but the
    parent's pidfd. It needs no GIL of the rank's, so it acts even while the rank's threads
    are stuck: when the kernel (or the template) dies it ends everything below the rank
    (daemons that left the group too), then the rank, then the group; when the rank dies
    first (its parent-death signal to the watcher), the rest of the group goes too (a
    DataLoader worker, a `sleep` the user started), which would otherwise be orphaned.
    Either way multiprocessing's resource tracker goes last (_descendants).
    """
    global _watcher
    if not sys.platform.startswith("linux"):
        return
    rank_pid = os.getpid()
    watcher = os.fork()
    if watcher != 0:
        _watcher = (watcher,)
        return
    try:
        rank_group = os.getpgrp()
        os.setpgid(0, 0)
        # Never keep a pipe to the kernel open: only the parent's pidfd stays.
        limit = os.sysconf("SC_OPEN_MAX")
        if parent_pidfd is None:
            os.closerange(0, limit)
        else:
            os.closerange(0, parent_pidfd)
            os.closerange(parent_pidfd + 1, limit)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(
            signal.SIGHUP, lambda signum, frame: _end_rank(rank_pid, rank_group, alive=False))
        die_with_parent(signal.SIGHUP)  # the rank: the watcher's only parent thread
        if os.getppid() == rank_pid:
            if parent_pidfd is None:
                while True:
                    signal.pause()
            select.select([parent_pidfd], [], [])  # returns when the parent has exited
        # The rank's parent died.
        _end_rank(rank_pid, rank_group, alive=os.getppid() == rank_pid)
    finally:
        os._exit(0)


def _end_rank(rank_pid: int, rank_group: int, alive: bool) -> NoReturn:
    """The watcher's last act: the rank's tree (while the rank lives, everything it started
    is below it), the rank, its group; resource trackers get time to clean up."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the rank's death, if we end it here
    end_processes(below=[rank_pid] if alive else [], groups=[rank_group],
                  tracker_wait=TRACKER_WAIT)
    os._exit(0)


def _line_buffer_c_stdio() -> None:
    """Make C's stdout stream: on a pipe it would hold output back until exit (line
    buffering on Linux, none on Windows: ``_os``)."""
    c_runtime = _c_runtime()
    if c_runtime is not None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            current.stream_c_stdout(c_runtime)


@functools.cache
def _c_runtime() -> ctypes.CDLL | None:
    """The C library whose stdio the rank's native code uses, or None. Loaded once: it is
    flushed before every reply."""
    with contextlib.suppress(OSError):
        return current.c_runtime()
    return None


def _flush_all(marker: int = 0) -> None:
    """Flush Python's and C's stdio, before a reply: what the rank printed comes first.

    Where a thread relays the output (the portable start), also mark the place in both
    streams (``_output_marks[marker]``: 0 before a reply, 1 on taking a call), so the
    kernel can tell how far the relay has come.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    c_runtime = _c_runtime()
    if c_runtime is not None:
        with contextlib.suppress(AttributeError):
            c_runtime.fflush(None)
    if _output_marks is not None:
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                os.write(fd, _output_marks[marker])


def _set_up_devices(init: Init) -> None:
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        if init.torch_dist:
            raise ImportError("torch_dist=True needs torch installed on the ranks")
        return
    if init.gpu is None and not init.torch_dist:
        return  # a CPU rank that was not asked for torch need not pay for importing it
    import torch

    if init.gpu is not None:
        # Before any other CUDA call: without it the first one would create a context on
        # cuda:0, which is rank 0's GPU.
        torch.cuda.set_device(init.rank)
    if init.torch_dist:
        import torch.distributed as dist

        # A FileStore in the World's private folder: torch's TCPStore would listen on every
        # interface, where anyone on the network could join the rendezvous.
        store = dist.FileStore(init.store_path, init.world_size)  # type: ignore[attr-defined]
        if init.gpu is not None and dist.is_nccl_available():
            dist.init_process_group(
                "nccl", store=store, rank=init.rank, world_size=init.world_size,
                device_id=torch.device("cuda", init.rank),
            )
        else:
            dist.init_process_group("gloo", store=store, rank=init.rank,
                                    world_size=init.world_size)


def _tear_down() -> None:
    """Destroy a process group that is still open, ours or one the user's code left."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _flush_all()


def _read_commands(conn: Connection, commands: queue.Queue[_protocol.Message]) -> None:
    """The control thread: commands in for the main thread, interrupt receipts out."""
    sources: list[Connection | socket.socket] = [conn, _interrupt_taken[0]]
    # One poll object for the rank's life: wait() builds a selector per command, a good
    # part of a warm call's cost on the rank. Windows has no poll(): wait() there.
    poller = select.poll() if hasattr(select, "poll") else None
    if poller is not None:
        for source in sources:
            poller.register(source.fileno(), select.POLLIN)
    while True:
        if poller is None:
            ready: list[object] = list(wait(sources))
        else:
            fds = {fd for fd, _ in poller.poll()}
            ready = [source for source in sources if source.fileno() in fds]
        if _interrupt_taken[0] in ready:
            taken = _interrupt_taken[0].recv(64)
            _send(conn, Interrupted(in_user_code=b"u" in taken))
        if conn not in ready:
            continue
        try:
            message = _protocol.recv(conn)
        except (EOFError, OSError):
            _end_with_kernel()
        if isinstance(message, Interrupt):
            _interrupt_main_thread()
            continue
        if isinstance(message, DebugInput):
            from ._rank_pdb import deliver

            deliver(message.prompt_id, message.line)
            continue
        if isinstance(message, DumpStacks):
            faulthandler.dump_traceback(file=_stacks_file, all_threads=True)
            _stacks_file.flush()
            continue
        commands.put(message)
        if isinstance(message, Close):
            return


def _follow_parent(parent_pid: int) -> None:
    """The portable start on POSIX (macOS: no pidfd, no watcher process): end the rank's
    tree once the kernel is gone, also before Ready and after Close, when no thread reads
    the channel. (Windows: the rank's job object does it.)"""
    while os.getppid() == parent_pid:
        time.sleep(PARENT_POLL)
    _end_with_kernel()


PARENT_POLL = 0.25


def _end_with_kernel() -> NoReturn:
    """The kernel is gone (killed, restarted): take the rank's whole tree down, children
    the user's code started included, resource trackers once the rank is gone (they
    clean up then). On Windows the rank's job object does that."""
    _runtime_dir.remove_process_dir()
    end_processes(below=[os.getpid()], groups=[os.getpgrp()], spare=_watcher)
    os._exit(1)


def _interrupt_main_thread() -> None:
    """What the kernel's SIGINT does where the kernel cannot send one (Interrupt).

    Sent to the main thread itself, so a blocking call there (a sleep, a read) returns with
    EINTR; on Windows raise_signal sets the event its sleeps and waits watch.
    """
    if hasattr(signal, "pthread_kill"):
        main_id = threading.main_thread().ident
        assert main_id is not None
        signal.pthread_kill(main_id, signal.SIGINT)
    else:
        signal.raise_signal(signal.SIGINT)


_send_lock = threading.Lock()


def _send(conn: Connection, message: _protocol.Message) -> None:
    """Send from either thread; a frame is never interleaved with another."""
    with _send_lock:
        _protocol.send(conn, message)


def _serve(conn: Connection, commands: queue.Queue[_protocol.Message]) -> None:
    namespace = sys.modules["__main__"].__dict__
    while True:
        message = commands.get()
        if _output_marks is not None:  # the portable start: mark where the call begins
            _flush_all(marker=1)  # what background threads wrote until now is not its
        if isinstance(message, Close):
            return
        assert isinstance(message, Call), message
        try:
            reply = _rank_call.execute(message, namespace, _folders)
        except SystemExit as request:
            _exit_as_asked(request)
        _flush_all()
        _send(conn, reply)


# While pdb's prompt is sent from within the user's code: False, or True once an interrupt
# came meanwhile (raised after the frame is out); None otherwise.
_interrupt_held: bool | None = None
# Written by the SIGINT handler, read by the control thread, which tells the kernel. Not
# _send: the handler runs in the main thread, possibly inside _send, so it must not take
# the lock. Made by main(), not at import.
_interrupt_taken: tuple[socket.socket, socket.socket]
# Set by main() for the portable start only: see _flush_all.
_output_marks: tuple[bytes, bytes] | None = None
_watcher: tuple[int, ...] = ()  # the watcher process's pid, where there is one
_parent_adopts = False  # set by main()
_stacks_file: TextIO
# The World's folders for big buffers in results (None: they go through the socket).
_folders: _dataplane.Folders | None = None


def _on_interrupt(signum: int, frame: Any) -> None:
    # The kernel forwards an interrupt as SIGINT. That this handler runs at all proves the
    # main thread is not stuck in C code, so the kernel hears about it and waits for the
    # answer. It must stop the user's code and nothing else: raised while a reply is being
    # framed it would corrupt the channel, and raised while idle there is nothing to stop.
    global _interrupt_held
    with contextlib.suppress(OSError):
        _interrupt_taken[1].send(b"u" if _rank_call.in_user_code() else b"o")
    if _rank_call.in_user_code():
        if _interrupt_held is not None:  # a frame is being sent from the user's code
            _interrupt_held = True
            return
        raise KeyboardInterrupt


def _exit_as_asked(request: SystemExit) -> NoReturn:
    """``sys.exit`` ends the rank, as it ends a torchrun worker: the kernel reports
    RankCrashed with the exit code. Sent back as an exception instead, SystemExit would end
    a script that called ``ranks.run`` rather than tell it a rank quit."""
    code = request.code
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)  # what Python does with sys.exit("message")
        status = 1
    _flush_all()
    _leave(status)


if __name__ == "__main__":  # pragma: no cover - started as `python -c` by the launcher
    main(sys.argv[1:])

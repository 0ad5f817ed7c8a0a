"""The kernel side of one World: starts its ranks, waits on them, stops them, cleans up.

Every wait is one ``multiprocessing.connection.wait`` over all of the ranks' control
channels, output pipes and process sentinels together, so a reply, a line of output and a
death wake the kernel alike. It also returns every INTERRUPT_POLL seconds: an interrupt
that comes without a signal (ipykernel on Windows calls ``_thread.interrupt_main()``)
wakes no wait. It runs in the thread that
made the call, which is why ipykernel files the ranks' output under the calling cell.

Stopping a rank escalates, each step after a short grace and only if the rank is still
running (the policy, its deadlines and graces are ``_escalation``'s; this module sends):

    SIGINT to the rank (its ``finally`` blocks and ``except KeyboardInterrupt`` run)
      --> SIGTERM to its process group --> SIGKILL to its process group

Where signals cannot reach one process (Windows, the portable start), the rank's handle
sends messages instead, and "its process group" is its job object (see ``_portable``).

A rank whose pdb waits for a line (``breakpoint()``, see ``_rank_pdb``) sends DebugPrompt;
the wait loop asks the user for that line (``_notebook.ask_user``: the cell's input box)
and sends it back, one prompt at a time, staying with the rank it asked last while that
rank keeps stopping. Meanwhile nothing else is read: the others run on until their output
pipe fills, or wait in a collective. Such a rank is not stuck: it answers SIGINT at once.

Escalation starts when a rank fails (the others are stopped at once: a peer blocked in a
Gloo or NCCL collective would otherwise wait for it forever), on ``timeout``, and on an
interrupt of the kernel; a second interrupt skips to SIGKILL. A rank that is still starting
runs none of the user's code, only ranks' own (and Python's): it skips SIGINT, whose
KeyboardInterrupt traceback from that code would only clutter the cell. Before an
interrupted call's rank is forced (SIGTERM, SIGKILL), its stacks are taken, so the
KeyboardInterrupt can say where it hung; on ``timeout`` those of every rank still running
are.

Stacks can also be asked for from any thread while a call runs (:meth:`Supervisor.stacks`,
behind ``World.stacks()``): the rank dumps them without stopping (``_stacks``).

What a wait ends with is an :class:`Outcome` per rank (``_attribution`` says which is the
cause); ``_report`` turns those into the exception the cell shows. An interrupt of the
kernel wakes the wait through ``_wakeup``.
"""

from __future__ import annotations

import _thread
import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from . import _attribution, _notebook, _protocol, _runtime_dir
from ._attribution import Outcome
from ._descendants import TRACKER_WAIT, end_processes
from ._errors import RankCrashed, RanksTimeout
from ._escalation import (
    FAILURE_INTERRUPT_GRACE,
    FORCE,
    INTERRUPT_GRACE,
    KILL_GRACE,
    TERMINATE,
    Escalation,
    Send,
)
from ._output import OutputRouter, Sink, TerminalSink, new_log_dir
from ._placement import RankSpec
from ._protocol import (
    Call,
    CallKind,
    Close,
    DebugInput,
    DebugPrompt,
    Done,
    Failed,
    Init,
    Interrupted,
    Ready,
)
from ._spawn import KILL, OutputStream, RankProcess, ready_among
from ._stacks import ENDED, ThreadStack, parse_dump, rank_text
from ._start import launch_ranks, prestart
from ._template import settle_closed_templates
from ._wakeup import InterruptWakeup

log = logging.getLogger("ranks")

CLOSE_GRACE = 10.0  # a clean Close destroys process groups and flushes; give it time
# faulthandler says nothing when a dump is complete: it gets STACK_DUMP_WAIT, and a rank
# whose dump has not begun by then (a loaded machine) up to STACK_DUMP_PATIENCE more.
STACK_DUMP_WAIT = 0.3
STACK_DUMP_PATIENCE = 1.0
STACK_DUMP_POLL = 0.05
INTERRUPT_POLL = 0.25
# After answering a rank's pdb, how long its next prompt (after `n`, `s`) is waited for
# before another rank's prompt is served: a session should not jump between ranks.
DEBUG_STAY = 0.3
NO_FRONTEND_NOTE = (
    "ranks: pdb stopped here, but nothing can answer it (this client sends no input, as"
    " nbclient does, or the script has no terminal); continuing as after `c`")
# How long a reply (or a call's start) waits for the output written before it, where a
# thread relays that output (see _catch_up_output). A rank whose user code closed or
# redirected its fd 1 or 2 waits it out once; the marks are then taken as read.
OUTPUT_CATCH_UP = 1.0
_READ_CHUNK = 1 << 16
# Chunks read from one pipe per wake-up: a rank that writes faster than the kernel routes
# must not keep the kernel in one read loop, away from deadlines and the other ranks.
_READS_PER_WAKE = 16


@dataclass
class WaitResult:
    outcomes: dict[int, Outcome]
    interrupted: bool
    timeout: RanksTimeout | None
    # Interrupted: where each rank that had to be forced (did not stop at SIGINT) was then.
    hung: dict[int, tuple[ThreadStack, ...]] = field(default_factory=dict)


class Supervisor:
    """Owns the processes of one World; every method runs in the calling thread."""

    def __init__(self, specs: list[RankSpec], cwd: str):
        self.specs = specs
        self._cwd = cwd
        self._procs: dict[int, RankProcess] = {}
        self._escalation = Escalation()
        self._hung_up: dict[int, float] = {}  # rank -> when its control channel hit EOF
        self._call_ids = itertools.count(1)
        self._shown: Callable[[int], bool] = lambda rank: True
        self.router = OutputRouter(new_log_dir(), _make_sink)
        self._tmpdir = _runtime_dir.new_dir("tmp-")
        try:
            self._wakeup = InterruptWakeup()
        except BaseException:  # (EMFILE) no World, so no close() that would remove it
            _runtime_dir.remove_dir(self._tmpdir, ())
            raise
        self._interrupts_seen = 0
        # While an interrupted call's ranks are stopped: the stacks of those forced so far.
        self._hung: dict[int, tuple[ThreadStack, ...]] | None = None
        self._stacks_lock = threading.Lock()  # one dump at a time: they share the files
        self._closed = False
        self._prompts: dict[int, DebugPrompt] = {}  # rank -> the line its pdb waits for
        self._debugging: tuple[int, float] | None = None  # rank asked last, when answered
        self._no_frontend = False  # found during this call: answer every prompt at once

    # --- life cycle -------------------------------------------------------------------

    def start(
        self,
        envs: Mapping[int, Mapping[str, str]],
        init_for: Callable[[RankSpec], Init],
        timeout: float | None,
        shown: Callable[[int], bool],
        started: float | None = None,
    ) -> WaitResult:
        """Start every rank with its environment in ``envs`` and wait until each is Ready
        (or one fails: then stop the rest).

        ``timeout`` counts from ``started`` (default: now) and covers launching too.
        """
        started = time.monotonic() if started is None else started
        deadline = None if timeout is None else started + timeout
        self._shown = shown
        requests = [
            (spec, envs[spec.rank], self._cwd, self._stacks_path(spec.rank))
            for spec in self.specs
        ]

        def launched(proc: RankProcess) -> None:
            self._procs[proc.spec.rank] = proc
            with contextlib.suppress(OSError):  # died at once: its sentinel says how
                proc.send(init_for(proc.spec))

        try:
            launch_ranks(requests, deadline, launched)
        except BaseException as error:
            # Those already running may wait in init_process_group for peers that will
            # never come, deaf to Close: end them now rather than after CLOSE_GRACE.
            for proc in self._procs.values():
                proc.signal_tree(KILL)
            prestart()  # a cause that failed this start (E2BIG, EMFILE) may pass later
            if isinstance(error, TimeoutError) and timeout is not None:
                raise RanksTimeout(timeout, {}) from None
            raise
        self.router.begin_call(self._shown)
        try:
            return self._wait([s.rank for s in self.specs], Ready, None, started, timeout,
                              "starting")
        finally:
            self.router.end_call()
            # The template, for the starts after this one: only now, so that its imports
            # do not take the CPU that these ranks needed to start.
            prestart()

    def close(self) -> None:
        """Ask every live rank to exit, escalate for those that do not; release everything."""
        if self._closed:
            return
        self._closed = True
        interrupted = False
        try:
            with self._wakeup.catching():
                self._drain()  # no call is bound: what ranks wrote since the last, to the logs
                interrupted = self._close_ranks()
        except KeyboardInterrupt:  # where our handler could not be installed
            interrupted = True
            for proc in self._procs.values():
                proc.signal_tree(KILL)
        finally:
            # Whatever happened above: nothing of this World outlives its close.
            try:
                for proc in self._procs.values():
                    proc.signal_tree(KILL)  # children a rank left behind
                    if proc.alive and _wait_for([proc.sentinel], KILL_GRACE):
                        proc.reap()  # not left a zombie (an interrupted close, a stuck rank)
                    for stream in list(proc.output):
                        self._read_output(proc, stream)
                    proc.release()
                # The resource trackers our KILL spared: they remove the segments the ranks'
                # multiprocessing objects left in /dev/shm, now that the ranks are gone.
                end_processes(groups=list(self.pids.values()), tracker_wait=TRACKER_WAIT)
                self.router.end_call()
                self.router.close()  # out of fds (EMFILE) a log may fail to open here
            finally:
                _runtime_dir.remove_dir(self._tmpdir, self._tmp_names())
                self._wakeup.close()
                settle_closed_templates()
        if interrupted:
            raise KeyboardInterrupt

    def _close_ranks(self) -> bool:
        """Close, then escalate for ranks that do not exit; True if interrupted meanwhile."""
        live = [p for p in self._procs.values() if p.alive]
        for proc in live:
            proc.calls += 1  # a rank marks its output on taking a Close as on taking a Call
            with contextlib.suppress(OSError):  # already gone: its sentinel says so below
                proc.send(Close())
        self._await_call_starts(live)
        self.router.begin_call(self._shown)  # what the ranks print while closing is shown
        self._drain()
        deadline: float | None = time.monotonic() + CLOSE_GRACE
        waiting = {p.spec.rank for p in live}
        interrupted = False
        while waiting:
            if deadline is not None and time.monotonic() >= deadline:
                log.info("ranks %s did not exit %.0f s after Close; terminating them",
                         sorted(waiting), CLOSE_GRACE)
                self._escalate(waiting, first_step=TERMINATE)
                deadline = None  # from here the escalation's own timers wake the wait
            try:
                self._pump(waiting, None, deadline, {})
            except KeyboardInterrupt:  # where our handler could not be installed
                self._interrupts_seen += 1
            if self._interrupts_seen:
                # Interrupted while closing: no more patience, but still no leftovers.
                self._interrupts_seen = 0
                interrupted = True
                self._escalate(waiting, first_step=FORCE)
        return interrupted

    def kill(self) -> None:
        """Stop now: SIGKILL every rank's process group, then release like close()."""
        for proc in self._procs.values():
            proc.signal_tree(KILL)
        self.close()

    @property
    def rendezvous_path(self) -> str:
        """Where ranks meet for torch_dist=True: a file only this user can reach."""
        return os.path.join(self._tmpdir, "rendezvous")

    def _stacks_path(self, rank: int) -> str:
        return os.path.join(self._tmpdir, f"stacks-{rank}.txt")

    def _tmp_names(self) -> list[str]:
        """What this World puts in its temporary folder."""
        return [self.rendezvous_path, *(self._stacks_path(s.rank) for s in self.specs)]

    def log_path(self, rank: int) -> str:
        return self.router.log_path(rank)

    @property
    def log_dir(self) -> str:
        return self.router.log_dir

    def keep_logs(self) -> None:
        """Keep the logs after close (an error points at them)."""
        self.router.keep()

    @property
    def pids(self) -> dict[int, int]:
        return {rank: proc.pid for rank, proc in self._procs.items()}

    def stacks(self) -> dict[int, tuple[ThreadStack, ...]]:
        """Every rank's threads now, without stopping them. Safe from any thread, also
        while a call waits in another (the lock it takes is the dump's alone)."""
        return self._collect_stacks(list(self._procs))

    def dead_ranks(self) -> list[int]:
        """Ranks whose process has ended, also those that died since the last call."""
        return [rank for rank, proc in self._procs.items() if proc.ended()]

    # --- calls -------------------------------------------------------------------------

    def call(
        self,
        kind: CallKind,
        payloads: Mapping[int, bytes],
        cells: Mapping[str, tuple[int, None, list[str], str]],
        timeout: float | None,
        shown: Callable[[int], bool],
        started: float | None = None,
    ) -> WaitResult:
        """Send one Call to each rank in ``payloads`` and wait for all of them to answer.

        ``timeout`` counts from ``started`` (default: now), so a one-shot call can count
        its start-up in.
        """
        started = time.monotonic() if started is None else started
        call_id = next(self._call_ids)
        self._drain()  # no call is bound: what ranks wrote since the last one, to the logs
        self._shown = shown
        for rank, payload in payloads.items():
            self._procs[rank].calls += 1
            # A rank that died since the World last looked: its sentinel reports how.
            with contextlib.suppress(OSError):
                self._procs[rank].send(Call(call_id, kind, payload, dict(cells)))
        called = [self._procs[rank] for rank in payloads]
        if any(proc.output_before_call() for proc in called):  # only a portable rank's
            try:
                with self._wakeup.catching():
                    self._await_call_starts(called)
            except KeyboardInterrupt:  # the call is running: _wait stops it as it should
                self._interrupts_seen += 1
        self.router.begin_call(shown)
        try:
            self._drain()  # what the ranks wrote since taking the call: the call's
            return self._wait(list(payloads), Done, call_id, started, timeout,
                              "running the function")
        finally:
            self.router.end_call()

    # --- waiting -----------------------------------------------------------------------

    def _wait(
        self,
        ranks: Iterable[int],
        expect: type[Ready] | type[Done],
        call_id: int | None,
        started: float,
        timeout: float | None,
        during: str,
    ) -> WaitResult:
        """Wait until each rank answered (``expect``, or Failed) or ended."""
        deadline = None if timeout is None else started + timeout
        pending = set(ranks)
        outcomes: dict[int, Outcome] = {}
        interrupted = False
        timed_out: RanksTimeout | None = None
        self._escalation.begin(starting=expect is Ready)
        self._hung = None
        with self._wakeup.catching():
            while pending:
                if deadline is not None and timed_out is None and time.monotonic() >= deadline:
                    timed_out = self._time_out(pending, timeout or 0.0)
                    self._escalate(pending)
                try:
                    self._pump(pending, (expect, call_id), None if timed_out else deadline,
                               outcomes, during)
                except KeyboardInterrupt:  # where our handler could not be installed
                    self._interrupts_seen += 1
                while self._interrupts_seen:
                    # First interrupt: stop the ranks gently. Second: kill them now.
                    self._interrupts_seen -= 1
                    if self._hung is None:
                        self._hung = {}  # from now on a forced rank's stacks are kept
                    self._escalate(pending, first_step=FORCE if interrupted else 0)
                    interrupted = True
                self._stop_on_failure(pending, outcomes)
                if self._prompts and not interrupted and timed_out is None:
                    self._serve_prompt(pending, deadline)
        self._escalation.end()
        self._prompts.clear()  # of ranks that were stopped: their pdb is gone
        self._debugging = None
        self._no_frontend = False
        self._drain()  # all that was written before the call ended is the call's (the cell's)
        self.router.flush()
        hung, self._hung = self._hung or {}, None
        return WaitResult(outcomes, interrupted, timed_out, hung)

    def _stop_on_failure(self, pending: set[int], outcomes: dict[int, Outcome]) -> None:
        if any(not o.ok and o.stopped_by is None for o in outcomes.values()):
            # One rank failed: stop the others at once.
            self._escalate(pending, interrupt_grace=FAILURE_INTERRUPT_GRACE)

    def _pump(
        self,
        pending: set[int],
        expect: tuple[type[Ready] | type[Done], int | None] | None,
        deadline: float | None,
        outcomes: dict[int, Outcome],
        during: str = "closing",
    ) -> None:
        """Wait once for anything from any rank (or a timer) and handle what arrived."""
        self._advance_escalation(pending, outcomes)
        now = time.monotonic()
        wake = [deadline] if deadline is not None else []
        wake += self._escalation.wake_times()
        due = self.router.due()  # a progress display that held back a redraw
        if due is not None:
            wake.append(due)
        timeout = min(max(0.0, min(wake) - now), INTERRUPT_POLL) if wake else INTERRUPT_POLL
        sources: dict[object, tuple[str, RankProcess | None, OutputStream | None]] = {
            self._wakeup.waitable: ("interrupt", None, None),
        }
        for proc in self._procs.values():
            rank = proc.spec.rank
            for out in proc.output:
                sources[out.waitable] = ("output", proc, out)
            if proc.alive:
                if rank not in self._hung_up:  # at EOF it stays readable: wait on the sentinel
                    sources[proc.conn] = ("control", proc, None)
                sources[proc.sentinel] = ("sentinel", proc, None)
            elif rank in pending:
                pending.discard(rank)  # died before this wait began
                self._record_death(proc, outcomes, during)
        if not pending:
            return
        ready = _wait_for(list(sources), timeout)
        # Output first, so the lines a rank printed come before its reply or its death.
        for key in sorted(ready, key=lambda k: sources[k][0] != "output"):
            kind, source, stream = sources[key]
            if kind == "interrupt":
                self._interrupts_seen += self._wakeup.take()
                continue
            assert source is not None
            proc = source
            if stream is not None:
                self._read_output(proc, stream)
            elif kind == "control":
                self._read_control(proc, expect, pending, outcomes)
            elif proc.alive:
                proc.reap()
                self._read_control(proc, expect, pending, outcomes)  # a last reply
                for out in list(proc.output):  # reading to EOF removes the stream
                    self._read_output(proc, out)
                self.router.finish(proc.spec.rank)
                if proc.spec.rank in pending:
                    pending.discard(proc.spec.rank)
                    self._record_death(proc, outcomes, during)
                self._escalation.settled(proc.spec.rank)
        self.router.flush()

    def _drain(self) -> None:
        """Read whatever the ranks wrote so far, without waiting, to where the router is bound.

        Output belongs to a call by when it was written. At the end of a wait, what is still
        unread (a pump cut short by an interrupt, say) goes to the call's cell. Before the
        next call or a close, no call is bound: what a rank wrote in between (a background
        thread) goes to the logs only, never into the cell that happens to run next.
        """
        for proc in self._procs.values():
            for stream in list(proc.output):
                self._read_output(proc, stream)

    def _read_output(self, proc: RankProcess, stream: OutputStream) -> None:
        for _ in range(_READS_PER_WAKE):
            data = stream.read(_READ_CHUNK)
            if data is None:
                return
            if not data:
                # EOF: every writer (the rank and any child of it) closed the pipe.
                proc.output.remove(stream)
                stream.close()
                return
            self.router.feed(proc.spec.rank, stream.name, data)
            if len(data) < _READ_CHUNK:
                return

    def _read_control(
        self,
        proc: RankProcess,
        expect: tuple[type[Ready] | type[Done], int | None] | None,
        pending: set[int],
        outcomes: dict[int, Outcome],
    ) -> None:
        """Take the rank's messages; the one ``expect`` names (or its Failed) ends its wait.

        Anything else is the late answer to a call that was already given up on.
        """
        rank = proc.spec.rank
        try:
            while ready_among([proc.conn], 0):  # conn.poll(), without its selector
                message = _protocol.recv(proc.conn)
                if isinstance(message, (Ready, Done, Failed, DebugPrompt)):
                    self._catch_up_output(proc)
                if isinstance(message, Interrupted):
                    self._escalation.responding(rank, message.in_user_code)
                    continue
                if isinstance(message, DebugPrompt):
                    self._prompts[rank] = message
                    continue
                if expect is None or rank not in pending:
                    continue
                kind, call_id = expect
                answers = isinstance(message, (kind, Failed))
                if answers and getattr(message, "call_id", call_id) == call_id:
                    pending.discard(rank)
                    self._escalation.settled(rank)
                    assert isinstance(message, (Done, Failed, Ready)), message
                    outcomes[rank] = _attribution.answered(
                        rank, message, time.monotonic(), self._escalation)
        except (EOFError, OSError):
            # The rank is dying. Its sentinel says how only later (the template reports
            # after reaping it); the EOF is the closest the kernel sees to when it died.
            self._hung_up.setdefault(rank, time.monotonic())

    def _await_call_starts(self, procs: list[RankProcess]) -> None:
        """Read, for the logs only, what each rank wrote before it took the call just sent.

        Only a portable rank's output can still be on its way (see ``_portable``): a thread
        relays it. Without this, what a background thread printed just before the call
        could show in the call's cell.
        """
        limit = time.monotonic() + OUTPUT_CATCH_UP
        while True:
            behind = [(proc, out) for proc in procs for out in proc.output_before_call()]
            if not behind:
                return
            if (left := limit - time.monotonic()) <= 0:
                # By rank: a RankProcess is a dataclass, so it cannot be put in a set.
                for proc in {proc.spec.rank: proc for proc, _ in behind}.values():
                    log.info("rank %d: the start of the call is not in its output after %g s",
                             proc.spec.rank, OUTPUT_CATCH_UP)
                    proc.output_lost()
                return
            _wait_for([out.waitable for _, out in behind], left)
            for proc, out in behind:
                self._read_output(proc, out)  # a read stops at the call's marker

    def _catch_up_output(self, proc: RankProcess) -> None:
        """Read the output the rank wrote before the reply just received, if it lags.

        Only a portable rank's can (see ``_portable``): a thread relays it, and the reply
        may overtake it. Read while waiting: the relay blocks when nobody reads.
        """
        proc.answers += 1
        limit = time.monotonic() + OUTPUT_CATCH_UP
        while proc.output_behind():
            if (left := limit - time.monotonic()) <= 0:
                log.info("rank %d: its output before the reply did not come in %g s",
                         proc.spec.rank, OUTPUT_CATCH_UP)
                proc.output_lost()
                return
            _wait_for([out.waitable for out in proc.output], left)
            for out in list(proc.output):
                self._read_output(proc, out)

    # --- pdb on the ranks ----------------------------------------------------------------

    def _serve_prompt(self, pending: set[int], deadline: float | None) -> None:
        """Ask the user for the line that one rank's pdb waits for, and send it there."""
        askable = [r for r in self._prompts if r in pending and r not in self._escalation]
        if not askable:
            return
        rank = askable[0]  # the one that asked first
        if self._debugging is not None:
            last, answered = self._debugging
            if last in askable:
                rank = last
            elif last in pending and time.monotonic() - answered < DEBUG_STAY:
                return  # it may stop again at once (after `n`): stay with it
        prompt = self._prompts.pop(rank)
        self._drain()  # the rank's listing above the input box
        self.router.release_held()
        self.router.flush()
        line: str | None = None
        if not self._no_frontend:
            try:
                line = self._ask_user(prompt.prompt, deadline)
            except _NotAnswered:
                return  # interrupted or out of time: the wait loop stops the ranks
            if line is None:
                self._no_frontend = True
                self.router.note(rank, NO_FRONTEND_NOTE)
                log.info("rank %d: %s", rank, NO_FRONTEND_NOTE)
        self._debugging = (rank, time.monotonic())
        with contextlib.suppress(OSError):  # died meanwhile: its sentinel says so
            _protocol.send(self._procs[rank].conn, DebugInput(prompt.prompt_id, line))

    def _ask_user(self, prompt: str, deadline: float | None) -> str | None:
        """``_notebook.ask_user``, stopped by the kernel's interrupt and by ``deadline``.

        While it waits, an interrupt must raise KeyboardInterrupt as Python's own handler
        does: ipykernel's raw_input polls its stdin socket and only that ends its wait. The
        deadline interrupts it the same way, from a timer (main thread only: an interrupt
        goes there).
        """
        self._interrupts_seen += self._wakeup.take()  # interrupted before we got here
        if self._interrupts_seen:
            raise _NotAnswered
        in_main = threading.current_thread() is threading.main_thread()
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _thread.interrupt_main()

        timer = None
        if deadline is not None and in_main:
            timer = threading.Timer(max(0.0, deadline - time.monotonic()), expire)
            timer.daemon = True
        previous = signal.signal(signal.SIGINT, signal.default_int_handler) if in_main else None
        try:
            if timer is not None:
                timer.start()
            try:
                return _notebook.ask_user(prompt)
            except EOFError:
                return "EOF"  # Ctrl+D: what pdb does at a terminal
            finally:
                if timer is not None:
                    timer.cancel()
                    timer.join()
        except KeyboardInterrupt:
            if not expired.is_set():
                self._interrupts_seen += 1
            raise _NotAnswered from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _record_death(self, proc: RankProcess, outcomes: dict[int, Outcome], during: str) -> None:
        rank = proc.spec.rank
        crash = RankCrashed(
            rank, proc.pid, proc.reap(), proc.spec.describe(), self.router.tail(rank), during,
            self.router.written_log(rank),
        )
        seen = self._hung_up.get(rank, time.monotonic())
        outcomes[rank] = _attribution.died(crash, seen, self._escalation)

    # --- stopping ----------------------------------------------------------------------

    def _escalate(
        self, ranks: Iterable[int], first_step: int = 0,
        interrupt_grace: float = INTERRUPT_GRACE,
    ) -> None:
        """Start (or speed up) stopping these ranks at ``first_step`` (see ``_escalation``)."""
        ranks = list(ranks)
        if first_step > 0:
            self._note_hung(ranks)
        self._send(self._escalation.escalate(ranks, first_step, interrupt_grace))

    def _advance_escalation(self, pending: set[int], outcomes: dict[int, Outcome]) -> None:
        """Send the steps that fell due; a rank that survived SIGKILL is given up on."""
        if self._note_hung(self._escalation.due_to_be_forced(pending)):
            return  # the dump took a while: first read who answered meanwhile
        sends, given_up = self._escalation.advance(pending)
        self._send(sends)
        for rank in given_up:
            pending.discard(rank)
            proc = self._procs[rank]
            outcomes[rank] = Outcome(
                rank,
                crash=RankCrashed(rank, proc.pid, None, proc.spec.describe(),
                                  self.router.tail(rank), "being stopped",
                                  self.router.written_log(rank)),
                stopped_by="SIGKILL", at=time.monotonic(),
            )

    def _send(self, sends: list[Send]) -> None:
        for send in sends:
            proc = self._procs[send.rank]
            if send.signum == signal.SIGINT:
                proc.interrupt()  # an interrupt is for the rank's main thread
            else:
                proc.signal_tree(send.signum)  # the whole tree: DataLoader workers too

    def _time_out(self, pending: set[int], timeout: float) -> RanksTimeout:
        """Ask each running rank for its Python stack (faulthandler), then build the error."""
        stacks = self._collect_stacks(sorted(pending))
        return RanksTimeout(timeout, {rank: rank_text(stacks[rank]) for rank in stacks})

    def _note_hung(self, ranks: list[int]) -> bool:
        """Before an interrupted call's ranks are forced: where they are, for the error.
        True if it took any (which takes a while)."""
        if self._hung is None:
            return False
        new = [rank for rank in ranks if rank not in self._hung]
        if new:
            self._hung.update(self._collect_stacks(new))
        return bool(new)

    def _collect_stacks(self, ranks: list[int]) -> dict[int, tuple[ThreadStack, ...]]:
        """Each rank's threads, dumped by its faulthandler into its stacks file."""
        with self._stacks_lock:
            live = [proc for proc in (self._procs[rank] for rank in ranks) if proc.alive]
            for proc in live:
                # Gone (closed meanwhile, from another thread): it reads as no answer.
                with contextlib.suppress(OSError):
                    proc.request_stacks()
            # The dump is written inside the rank's signal handler (or, on the portable
            # start, by its control thread, which exists only once the rank is Ready).
            time.sleep(STACK_DUMP_WAIT)
            patience = time.monotonic() + STACK_DUMP_PATIENCE
            late = False
            while any(not _read(p.stacks_path) for p in live) and time.monotonic() < patience:
                late = True
                time.sleep(STACK_DUMP_POLL)
            if late:
                time.sleep(STACK_DUMP_POLL)  # a dump that began late may be half-written
            dumps = {proc.spec.rank: _read(proc.stacks_path) for proc in live}
        ended = (ThreadStack(main=True, summary=ENDED),)
        return {rank: parse_dump(dumps[rank]) if rank in dumps else ended for rank in ranks}


class _NotAnswered(Exception):
    """The user interrupted the wait for a line, or the call ran out of time."""


def _wait_for(sources: list[object], timeout: float | None) -> list[object]:
    """``ready_among`` (``multiprocessing.connection.wait``), where an interrupt only wakes it up.

    On Windows a SIGINT in the main thread makes it raise InterruptedError (POSIX retries
    after the handler ran); our handler has noted the interrupt by then.
    """
    try:
        return ready_among(sources, timeout)
    except InterruptedError:
        return []


def _make_sink() -> Sink:
    return _notebook.NotebookSink() if _notebook.in_ipykernel() else TerminalSink()


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as dump:
            return dump.read()
    except OSError:  # the World closed meanwhile (from another thread)
        return ""

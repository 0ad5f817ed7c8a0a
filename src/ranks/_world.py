"""``ranks.World``: ranks that stay alive across calls, each with its own namespace.

A World validates what it is given before any process starts, builds each rank's
environment (torchrun's variables, its GPUs, the kernel's own environment otherwise),
and hands the processes to its backend (``_backends``: where the ranks run; ``local``, this
machine, is ``_supervisor``'s), which it owns. One-shot ``ranks.run`` is a World
that lives for one call.

A World whose rank died is *broken*: its remaining ranks are stopped (their peers in a
collective would wait forever) and every later call says so instead of hanging. A World
is closed by ``close()``, by ``with``, when it is garbage-collected, or at interpreter exit
(``weakref.finalize``), and closing twice is safe.

A World may be used from several threads (a cell that trains, a thread that watches): its
calls are serialised. One that finds another thread's call running waits for it to end; its
``timeout`` counts that wait, and an interrupt ends the wait. ``close()`` and ``status()``
wait their turn too, so none of them ever sees a call half done.
"""

from __future__ import annotations

import itertools
import linecache
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from . import _backends, _dataplane, _frameworks, _namespace, _notebook, _serialize
from ._backends import Backend, Rendezvous
from ._dataplane import Folders
from ._errors import RanksError, RanksTimeout, WorldBroken, add_note
from ._os import current
from ._placement import RankSpec, gpu_memory_by_pid, plan_ranks, visible_gpus
from ._protocol import CallKind, Done, Init
from ._report import build_error, raising_rank
from ._stacks import Stacks, hang_note
from ._supervisor import INTERRUPT_POLL, WaitResult

Output = Literal["all", "rank0", "none"] | Sequence[int]

# Set by ranks on every rank, as torchrun does; the user's env= may not override them.
TORCHRUN_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
)
_exec_counter = itertools.count(1)
# How long the finalizer, at interpreter exit, waits for a call that a daemon thread is
# still in before it ends the ranks all the same.
CLOSE_WAIT = 10.0


@dataclass(frozen=True)
class RankStatus:
    rank: int
    pid: int
    device: str
    gpu_memory_mib: int | None  # None where no GPU memory is reported for the pid
    state: str  # idle | dead | broken | closed


class World:
    """Persistent ranks: ``run``, ``exec``, ``push``, ``pull``, ``stacks``; ``close`` (or ``with``).

    ``n`` CPU ranks, or one rank per GPU in ``gpus`` (default: every visible GPU).
    ``torch_dist=True`` creates the process group once (NCCL on GPUs, Gloo on CPUs) and
    keeps it until the World closes. ``env`` adds environment variables on every rank.
    Results that hold CUDA tensors arrive in the kernel as CPU tensors.

    Calls from several threads run one at a time: a call waits while another thread's runs
    (its ``timeout`` counts the wait); ``close()`` waits for a running call to end.
    """

    _one_shot = False

    def __init__(
        self,
        n: int | None = None,
        gpus: Sequence[int] | None = None,
        *,
        torch_dist: bool = False,
        env: Mapping[str, str] | None = None,
        backend: str = "local",
    ) -> None:
        __tracebackhide__ = True
        specs, extra_env = _check_world(n, gpus, torch_dist, env, backend)
        self._start(specs, torch_dist, extra_env, backend, None, lambda rank: True, None)

    @classmethod
    def _started(
        cls, specs: list[RankSpec], torch_dist: bool, extra_env: Mapping[str, str],
        backend: str, timeout: float | None, shown: Callable[[int], bool], started: float,
    ) -> World:
        """ranks.run's own World: the user never sees it, and its call's ``timeout`` and
        ``output`` already apply while it starts."""
        world = cls.__new__(cls)
        world._one_shot = True
        world._start(specs, torch_dist, extra_env, backend, timeout, shown, started)
        return world

    def _start(
        self, specs: list[RankSpec], torch_dist: bool, extra_env: Mapping[str, str],
        backend: str, timeout: float | None, shown: Callable[[int], bool],
        started: float | None,
    ) -> None:
        __tracebackhide__ = True
        self._specs = specs
        self._broken: str | None = None
        self._sent_cells: set[str] = set()
        self._raised_on: int | None = None  # the rank of the last call's exception, for debug()
        self._big_sent: dict[str, weakref.ref[Any]] = {}  # see _warn_if_resent
        self._big_warned: set[str] = set()
        # Held by whichever thread uses the backend, which is not thread-safe: two calls
        # at once would read each other's replies. Reentrant: close() holds it and then
        # runs the finalizer, which takes it too.
        self._lock = threading.RLock()
        self._folders = Folders.create()
        try:  # until the finalizer owns them, the folders are removed here if the start fails
            if self._folders is not None:
                extra_env = {**extra_env,
                             _dataplane.FOLDERS_VARIABLE: self._folders.as_variable()}
            cwd = os.getcwd()
            sys_path = _notebook.kernel_sys_path()
            self._backend = _backends.create(backend, specs, cwd)
        except BaseException:
            if self._folders is not None:
                self._folders.remove()
            raise
        self._finalizer = weakref.finalize(
            self, _close_backend, self._lock, self._backend, self._folders)
        try:
            meet = self._backend.rendezvous
            envs = _rank_environments(specs, extra_env, meet, self._backend.free_port)
            ready = self._backend.start(
                envs,
                lambda spec: Init(spec.rank, spec.world_size, spec.gpu, torch_dist, sys_path, cwd,
                                  meet.store_path),
                timeout, shown, started,
            )
        except KeyboardInterrupt:
            self._finalizer()
            # A fresh one: where the interrupt landed in ranks' start-up machinery (a launch,
            # a connection) is no business of the user's, and the cell shows no such frames.
            raise KeyboardInterrupt from None
        except BaseException:
            self._finalizer()
            raise
        error = self._failure_of(ready)
        if error is not None:
            self._finalizer()
            raise error

    # --- the public surface ---------------------------------------------------------------

    @property
    def size(self) -> int:
        return len(self._specs)

    def run(
        self,
        fn: Callable[..., Any],
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        output: Output = "all",
    ) -> list[Any]:
        """``fn(*args, **kwargs)`` on every rank; the results in rank order."""
        __tracebackhide__ = True
        args, kwargs = _check_call(fn, args, kwargs, timeout)
        shown = _shown_ranks(output, self.size)
        payload = _serialize.dumps_call(fn, args, kwargs, self._folders is not None)
        self._warn_if_resent(fn)
        return self._call(CallKind.RUN, dict.fromkeys(range(self.size), payload), timeout, shown)

    def exec(self, source: str, ranks: Sequence[int] | None = None, *,
             timeout: float | None = None) -> None:
        """Execute ``source`` in each rank's namespace (its ``__main__``).

        Names ``source`` reads that a rank lacks come from the caller's globals (a notebook
        cell's are the notebook's): functions, classes and modules, and values up to
        ``ranks._namespace.MAX_VALUE_BYTES`` pickled; a name the rank defines stays its own.
        """
        __tracebackhide__ = True
        self._exec(source, ranks, timeout, sys._getframe(1).f_globals)

    def _exec(self, source: str, ranks: Sequence[int] | None, timeout: float | None,
              notebook: Mapping[str, Any]) -> None:
        """``exec``, with the names the cell reads looked up in ``notebook``."""
        __tracebackhide__ = True
        if not isinstance(source, str):
            raise TypeError(f"source must be a str, not {type(source).__name__}")
        targets = _check_ranks(ranks, self.size)
        filename = f"<ranks-cell-{next(_exec_counter)}>"
        # Registered like an IPython cell, so a traceback on the rank shows these lines.
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        taken = _namespace.collect(source, notebook, _namespace.notebook_hidden(notebook))
        # In the stream: notebook values are small (_namespace limits them), and the rank
        # unpickles each one only where it lacks the name.
        payload = _serialize.pack((source, filename, taken), out_of_band=False)
        self._call(CallKind.EXEC, dict.fromkeys(targets, payload), timeout, lambda r: True)

    def push(self, **values: Any) -> None:
        """Bind each ``name=value`` in every rank's namespace."""
        __tracebackhide__ = True
        try:
            payload = _serialize.pack(values, self._folders is not None)
        except Exception as error:
            bad = [k for k, v in values.items() if not _serialize._picklable(v)]
            raise TypeError(f"cannot push {bad} to the ranks: {error}") from error
        self._call(CallKind.PUSH, dict.fromkeys(range(self.size), payload), None, lambda r: True)

    def pull(self, name: str, rank: int | None = None) -> Any:
        """The value bound to ``name`` on each rank (a list), or on ``rank`` alone."""
        __tracebackhide__ = True
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        targets = _check_ranks(None if rank is None else [rank], self.size)
        payload = _serialize.pack(name, out_of_band=False)
        values = self._call(CallKind.PULL, dict.fromkeys(targets, payload), None, lambda r: True)
        return values if rank is None else values[0]

    def status(self) -> list[RankStatus]:
        """One row per rank: pid, device, GPU memory in use (MiB) and state (after the call
        another thread is running, if any)."""
        with self._turn(None, time.monotonic()):
            return self._status()

    def _status(self) -> list[RankStatus]:
        dead = set() if self.closed else set(self._backend.dead_ranks())
        memory = gpu_memory_by_pid()
        rows = []
        for spec in self._specs:
            pid = self._backend.pids[spec.rank]
            if self.closed:
                state = "closed"
            else:
                state = "dead" if spec.rank in dead else ("broken" if self._broken else "idle")
            rows.append(RankStatus(spec.rank, pid, spec.describe(), memory.get(pid), state))
        return rows

    def stacks(self) -> Stacks:
        """The Python stack of every thread of every rank, taken without stopping them.

        Shown with identical stacks once, labelled with the ranks that share them. Meant
        for a call that hangs: it works from another thread while that call runs, and
        between calls (ranks waiting for the next call show as idle).
        """
        if self.closed:
            raise RanksError("this World is closed; start a new one")
        return Stacks(self._backend.stacks())

    def debug(self, rank: int | None = None) -> None:
        """pdb at the frame where the last failed call raised on ``rank``, as IPython's
        ``%debug``: by default the rank whose exception the cell showed. Its prompt, labelled
        with the rank, reads from the cell's input box; ``q`` ends it."""
        __tracebackhide__ = True
        if rank is None:
            rank = self._raised_on
            if rank is None:
                raise RanksError("no call on this World raised on a rank yet: nothing to"
                                 " debug (World.debug(rank=R) picks a rank)")
        targets = _check_ranks([rank], self.size)
        nothing = _serialize.Packed(b"")
        self._call(CallKind.DEBUG, dict.fromkeys(targets, nothing), None, lambda r: True)

    def log_path(self, rank: int) -> str:
        """The file holding everything ``rank`` printed (also what was not shown)."""
        return self._backend.log_path(rank)

    def close(self) -> None:
        """Stop every rank and release everything; safe to call again. A call that another
        thread is running ends first."""
        with self._turn(None, time.monotonic()):
            self._finalizer()

    @property
    def broken(self) -> str | None:
        """Why this World can no longer be used (a rank ended), or None while it can."""
        with self._turn(None, time.monotonic()):
            if not self.closed:
                self._mark_broken_if_dead()
        return self._broken

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> World:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("broken" if self._broken else "running")
        return f"<ranks.World of {self.size} ranks, {state}>"

    # --- internals ----------------------------------------------------------------------

    def _call(
        self, kind: CallKind, payloads: dict[int, _serialize.Packed], timeout: float | None,
        shown: Callable[[int], bool], started: float | None = None,
    ) -> list[Any]:
        __tracebackhide__ = True
        started = time.monotonic() if started is None else started
        with self._turn(timeout, started):
            return self._call_now(kind, payloads, timeout, shown, started)

    def _call_now(
        self, kind: CallKind, payloads: dict[int, _serialize.Packed], timeout: float | None,
        shown: Callable[[int], bool], started: float,
    ) -> list[Any]:
        __tracebackhide__ = True
        if self.closed:
            raise RanksError("this World is closed; start a new one")
        # A rank can also die between calls (the OOM killer, a stray kill): say so rather
        # than fail on its closed channel.
        if not self._one_shot:  # ranks.run's rank that died meanwhile: RankCrashed below
            self._mark_broken_if_dead()
        if self._broken is not None:
            raise WorldBroken(self._broken)
        cells = _notebook.cell_sources(self._sent_cells)
        staged: dict[int, bytes] = {}  # id(Packed) -> payload: what all ranks get, once
        try:
            sent = {}
            for rank, packed in payloads.items():
                if id(packed) not in staged:
                    staged[id(packed)] = _dataplane.stage(packed, self._folders)
                sent[rank] = staged[id(packed)]
            result = self._backend.call(kind, sent, cells, timeout, shown, started)
        finally:
            # Every rank has answered or ended: none maps the arguments' file any more.
            for payload in staged.values():
                _dataplane.release(payload)
        replies = {rank: o.reply for rank, o in result.outcomes.items()}
        raised_on = raising_rank(result.outcomes)
        if raised_on is not None and kind in (CallKind.RUN, CallKind.EXEC):
            self._raised_on = raised_on  # what the ranks keep for debug(): see _worker
        error = self._failure_of(result)
        if error is not None:
            _release_results(replies)
            raise error
        values = []
        for rank in sorted(payloads):
            reply = replies.pop(rank)
            assert isinstance(reply, Done), reply
            try:
                values.append(_dataplane.load(reply.payload, consume=True))
            except BaseException as unpickling:
                _release_results(replies)
                add_note(unpickling, f"ranks: while unpickling the result of rank {rank}"
                         " in the kernel")
                raise
        return values

    def _warn_if_resent(self, fn: Callable[..., Any]) -> None:
        """Say once per global when a call ships the same big array or tensor as the call
        before it did: it is copied into shared memory on every call."""
        for label, value, size in _serialize.big_captures(fn):
            try:
                before = self._big_sent.get(label)
                self._big_sent[label] = weakref.ref(value)
            except TypeError:  # cannot be weakly referenced: cannot be recognised either
                continue
            if before is not None and before() is value and label not in self._big_warned:
                self._big_warned.add(label)
                name = label.split("'")[1] if "'" in label else "x"
                warnings.warn(
                    f"ranks: the {label} ({size / 2**20:.1f} MiB) is sent to the ranks again"
                    f" with every call; send it once with World.push({name}={name}) (or"
                    f" `%ranks push {name}`) and use it on the ranks by name",
                    RuntimeWarning, stacklevel=3,
                )

    @contextmanager
    def _turn(self, timeout: float | None, started: float) -> Iterator[None]:
        """Hold the World while the block runs, once no other thread's call is running.

        The wait wakes every INTERRUPT_POLL seconds: an interrupt that comes without a
        signal (ipykernel on Windows) is raised only between waits. Out of ``timeout``
        (counted from ``started``) before its turn, the call is given up: nothing was sent.
        """
        __tracebackhide__ = True
        deadline = None if timeout is None else started + timeout
        while True:
            wait = INTERRUPT_POLL
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            if self._lock.acquire(timeout=wait):
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise RanksTimeout(timeout or 0.0, {}, waited=True)
        try:
            yield
        finally:
            self._lock.release()

    def _mark_broken_if_dead(self) -> list[int]:
        """The ranks that have ended; if any, the World is broken and the others are killed."""
        dead = self._backend.dead_ranks()
        if dead and self._broken is None:
            self._broken = f"rank(s) {dead} ended"
            self._backend.kill()  # the survivors would wait on the dead in collectives
        return dead

    def _failure_of(self, result: WaitResult) -> BaseException | None:
        """The exception a finished wait ends in, marking the World broken if a rank died."""
        dead = self._mark_broken_if_dead()
        pids = self._backend.pids
        devices = {s.rank: s.describe() for s in self._specs}
        error = build_error(result.outcomes, pids, devices)
        if result.timeout is not None:
            error = result.timeout
        elif result.interrupted:
            error = KeyboardInterrupt()
            # Those that had to be terminated or killed for it, while they ran a call: a
            # rank still starting is ended at once, as it should be.
            killed = sorted(rank for rank, outcome in result.outcomes.items()
                            if outcome.crash is not None and outcome.crash.during != "starting"
                            and outcome.stopped_by in ("SIGTERM", "SIGKILL"))
            if killed:
                add_note(error, f"ranks: ranks {killed} did not stop in time and were killed")
            if result.hung:
                add_note(error, hang_note(result.hung))
        if error is not None:
            self._backend.keep_logs()  # the error may point at the logs
        if isinstance(error, RanksTimeout):
            add_note(error, f"ranks: all the ranks printed (until the kernel exits):"
                     f" {self._backend.log_dir}")
        if error is not None and dead and not self._one_shot:
            # Said by whichever error the cell shows: a timeout or an interrupt that had to
            # kill, as much as a crash, leaves the World unusable.
            add_note(error, "ranks: this World is broken; start a new one (or `%ranks restart`)")
        return error


def _release_results(replies: Mapping[int, object]) -> None:
    """Results that will never be unpickled (the call failed): their files go now."""
    for reply in replies.values():
        if isinstance(reply, Done):
            _dataplane.release(reply.payload)


def _close_backend(lock: threading.RLock, backend: Backend, folders: Folders | None) -> None:
    """The World's finalizer: ``close()``, garbage collection, interpreter exit.

    At exit a daemon thread may still be in a call: after CLOSE_WAIT its ranks are ended
    all the same, since nothing of a World may outlive the interpreter.
    """
    held = lock.acquire(timeout=CLOSE_WAIT)
    try:
        backend.close()
    finally:
        if held:
            lock.release()
        if folders is not None:
            folders.remove()  # results the kernel still holds stay mapped


def _check_world(
    n: int | None, gpus: Sequence[int] | None, torch_dist: bool,
    env: Mapping[str, str] | None, backend: str,
) -> tuple[list[RankSpec], dict[str, str]]:
    _backends.check(backend)
    if not isinstance(torch_dist, bool):
        raise TypeError(f"torch_dist must be True or False, not {torch_dist!r}")
    extra = _check_env(env)
    specs = plan_ranks(n, gpus, visible_gpus())
    most = current.MAX_RANKS_WAITED  # Windows before Python 3.13: see _os.windows
    if most is not None and len(specs) > most:
        raise RanksError(f"{len(specs)} ranks on Windows need Python 3.13 or newer; this"
                         f" Python waits on at most {most} ranks")
    return specs, extra


def _check_env(env: Mapping[str, str] | None) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise TypeError(f"env must be a mapping of str to str, not {type(env).__name__}")
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"env must map str to str; {key!r}: {value!r} does not")
        if key in TORCHRUN_VARIABLES or key == "CUDA_VISIBLE_DEVICES":
            raise ValueError(f"env may not set {key}: ranks sets it for each rank (use gpus=)")
    return dict(env)


def _check_call(
    fn: Callable[..., Any], args: Iterable[Any], kwargs: Mapping[str, Any] | None,
    timeout: float | None,
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}: {fn!r}")
    if isinstance(args, (str, bytes)) or not isinstance(args, Iterable):
        raise TypeError(f"args must be a tuple of arguments, not {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise TypeError(f"kwargs must be a mapping, not {type(kwargs).__name__}")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0
    ):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    return tuple(args), dict(kwargs or {})


def _check_ranks(ranks: Sequence[int] | None, size: int) -> list[int]:
    if ranks is None:
        return list(range(size))
    chosen = list(ranks)
    bad = [r for r in chosen if isinstance(r, bool) or not isinstance(r, int) or not 0 <= r < size]
    if bad or not chosen:
        raise ValueError(f"ranks {chosen} are not all in 0..{size - 1}")
    return sorted(set(chosen))


def _shown_ranks(output: Output, size: int) -> Callable[[int], bool]:
    if output == "all":
        return lambda rank: True
    if output == "rank0":
        return lambda rank: rank == 0
    if output == "none":
        return lambda rank: False
    if isinstance(output, str):
        raise ValueError(
            f"output must be 'all', 'rank0', 'none' or a list of ranks, not {output!r}"
        )
    chosen = frozenset(_check_ranks(output, size))
    return lambda rank: rank in chosen


def _rank_environments(
    specs: list[RankSpec], extra: Mapping[str, str], meet: Rendezvous,
    free_port: Callable[[], int],
) -> dict[int, dict[str, str]]:
    base = _notebook.kernel_environment()
    base.update(extra)
    size = len(specs)
    visible = visible_gpus()
    if specs[0].gpu is None:
        cuda_mask = ""  # CPU ranks must not take a GPU another program may be using
    else:
        cuda_mask = ",".join(visible[s.gpu] for s in specs if s.gpu is not None)
    shared = {
        "WORLD_SIZE": str(size), "LOCAL_WORLD_SIZE": str(size), "GROUP_RANK": "0",
        "NODE_RANK": "0", "ROLE_NAME": "default", "ROLE_WORLD_SIZE": str(size),
        "MASTER_ADDR": meet.address, "MASTER_PORT": str(meet.port),
        "TORCHELASTIC_RUN_ID": f"ranks-{os.getpid()}-{time.monotonic_ns()}",
        "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
        "CUDA_VISIBLE_DEVICES": cuda_mask, "PYTHONUNBUFFERED": "1",
    }
    if size > 1:
        base.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: ranks share the cores
    if meet.socket_ifname is not None:  # where Gloo and NCCL listen, unless the user says
        base.setdefault("GLOO_SOCKET_IFNAME", meet.socket_ifname)
        base.setdefault("NCCL_SOCKET_IFNAME", meet.socket_ifname)
    for name, value in current.RANK_ENVIRONMENT.items():  # USE_LIBUV=0 on Windows (_os)
        base.setdefault(name, value)
    frameworks = _frameworks.environments(specs, meet.address, free_port)
    envs = {}
    for spec in specs:
        env = {**base, **frameworks[spec.rank], **extra, **shared}
        env.update(RANK=str(spec.rank), LOCAL_RANK=str(spec.rank), ROLE_RANK=str(spec.rank))
        envs[spec.rank] = env
    return envs

"""``ranks.World``: ranks that stay alive across calls, each with its own namespace.

A World validates what it is given before any process starts, builds each rank's
environment (torchrun's variables, its GPUs, the kernel's own environment otherwise),
and hands the processes to a Supervisor, which it owns. One-shot ``ranks.run`` is a World
that lives for one call.

A World whose rank died is *broken*: its remaining ranks are stopped (their peers in a
collective would wait forever) and every later call says so instead of hanging. A World
is closed by ``close()``, by ``with``, when it is garbage-collected, or at interpreter exit
(``weakref.finalize``), and closing twice is safe.
"""

from __future__ import annotations

import itertools
import linecache
import os
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from . import _frameworks, _namespace, _notebook, _serialize
from ._errors import RanksError, WorldBroken, add_note
from ._placement import RankSpec, gpu_memory_by_pid, plan_ranks, visible_gpus
from ._protocol import CallKind, Done, Init
from ._report import build_error
from ._supervisor import Supervisor, WaitResult

Output = Literal["all", "rank0", "none"] | Sequence[int]

# Set by ranks on every rank, as torchrun does; the user's env= may not override them.
TORCHRUN_VARIABLES = (
    "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
    "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS",
)
_exec_counter = itertools.count(1)


@dataclass(frozen=True)
class RankStatus:
    rank: int
    pid: int
    device: str
    gpu_memory_mib: int | None  # None where no GPU memory is reported for the pid
    state: str  # idle | dead | broken | closed


class World:
    """Persistent ranks: ``run``, ``exec``, ``push``, ``pull``; ``close`` (or ``with``).

    ``n`` CPU ranks, or one rank per GPU in ``gpus`` (default: every visible GPU).
    ``torch_dist=True`` creates the process group once (NCCL on GPUs, Gloo on CPUs) and
    keeps it until the World closes. ``env`` adds environment variables on every rank.
    Results that hold CUDA tensors arrive in the kernel as CPU tensors.
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
        self._start(specs, torch_dist, extra_env, None, lambda rank: True, None)

    @classmethod
    def _started(
        cls, specs: list[RankSpec], torch_dist: bool, extra_env: Mapping[str, str],
        timeout: float | None, shown: Callable[[int], bool], started: float,
    ) -> World:
        """ranks.run's own World: the user never sees it, and its call's ``timeout`` and
        ``output`` already apply while it starts."""
        world = cls.__new__(cls)
        world._one_shot = True
        world._start(specs, torch_dist, extra_env, timeout, shown, started)
        return world

    def _start(
        self, specs: list[RankSpec], torch_dist: bool, extra_env: Mapping[str, str],
        timeout: float | None, shown: Callable[[int], bool], started: float | None,
    ) -> None:
        __tracebackhide__ = True
        self._specs = specs
        self._broken: str | None = None
        self._sent_cells: set[str] = set()
        envs = _rank_environments(specs, extra_env)
        cwd = os.getcwd()
        sys_path = _notebook.kernel_sys_path()
        self._supervisor = Supervisor(specs, envs, cwd)
        self._finalizer = weakref.finalize(self, self._supervisor.close)
        try:
            ready = self._supervisor.start(
                lambda spec: Init(spec.rank, spec.world_size, spec.gpu, torch_dist, sys_path, cwd,
                                  self._supervisor.rendezvous_path),
                timeout, shown, started,
            )
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
        payload = _serialize.dumps_call(fn, args, kwargs)
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
        payload = _serialize.dumps((source, filename, taken))
        self._call(CallKind.EXEC, dict.fromkeys(targets, payload), timeout, lambda r: True)

    def push(self, **values: Any) -> None:
        """Bind each ``name=value`` in every rank's namespace."""
        __tracebackhide__ = True
        try:
            payload = _serialize.dumps(values)
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
        payload = _serialize.dumps(name)
        values = self._call(CallKind.PULL, dict.fromkeys(targets, payload), None, lambda r: True)
        return values if rank is None else values[0]

    def status(self) -> list[RankStatus]:
        """One row per rank: pid, device, GPU memory in use (MiB) and state."""
        dead = set() if self.closed else set(self._supervisor.dead_ranks())
        memory = gpu_memory_by_pid()
        rows = []
        for spec in self._specs:
            pid = self._supervisor.pids[spec.rank]
            if self.closed:
                state = "closed"
            else:
                state = "dead" if spec.rank in dead else ("broken" if self._broken else "idle")
            rows.append(RankStatus(spec.rank, pid, spec.describe(), memory.get(pid), state))
        return rows

    def log_path(self, rank: int) -> str:
        """The file holding everything ``rank`` printed (also what was not shown)."""
        return self._supervisor.log_path(rank)

    def close(self) -> None:
        """Stop every rank and release everything; safe to call again."""
        self._finalizer()

    @property
    def broken(self) -> str | None:
        """Why this World can no longer be used (a rank ended), or None while it can."""
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
        self, kind: CallKind, payloads: dict[int, bytes], timeout: float | None,
        shown: Callable[[int], bool], started: float | None = None,
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
        result = self._supervisor.call(kind, payloads, cells, timeout, shown, started)
        error = self._failure_of(result)
        if error is not None:
            raise error
        values = []
        for rank in sorted(payloads):
            reply = result.outcomes[rank].reply
            assert isinstance(reply, Done), reply
            try:
                values.append(_serialize.loads(reply.payload))
            except BaseException as unpickling:
                add_note(unpickling, f"ranks: while unpickling the result of rank {rank}"
                         " in the kernel")
                raise
        return values

    def _mark_broken_if_dead(self) -> list[int]:
        """The ranks that have ended; if any, the World is broken and the others are killed."""
        dead = self._supervisor.dead_ranks()
        if dead and self._broken is None:
            self._broken = f"rank(s) {dead} ended"
            self._supervisor.kill()  # the survivors would wait on the dead in collectives
        return dead

    def _failure_of(self, result: WaitResult) -> BaseException | None:
        """The exception a finished wait ends in, marking the World broken if a rank died."""
        dead = self._mark_broken_if_dead()
        pids = self._supervisor.pids
        devices = {s.rank: s.describe() for s in self._specs}
        error = build_error(result.outcomes, pids, devices)
        if result.timeout is not None:
            error = result.timeout
        elif result.interrupted:
            error = KeyboardInterrupt()
            if dead:
                add_note(error, f"ranks: ranks {dead} did not stop in time and were killed")
        if error is not None and dead and not self._one_shot:
            # Said by whichever error the cell shows: a timeout or an interrupt that had to
            # kill, as much as a crash, leaves the World unusable.
            add_note(error, "ranks: this World is broken; start a new one (or `%ranks restart`)")
        return error


MAX_RANKS_WAITED = 15  # Windows before Python 3.13: see _check_world


def _check_world(
    n: int | None, gpus: Sequence[int] | None, torch_dist: bool,
    env: Mapping[str, str] | None, backend: str,
) -> tuple[list[RankSpec], dict[str, str]]:
    if backend != "local":
        raise ValueError(f"backend={backend!r} is not available; use backend='local'")
    if not isinstance(torch_dist, bool):
        raise TypeError(f"torch_dist must be True or False, not {torch_dist!r}")
    extra = _check_env(env)
    specs = plan_ranks(n, gpus, visible_gpus())
    if sys.platform == "win32" and sys.version_info < (3, 13) and len(specs) > MAX_RANKS_WAITED:
        # Each rank is four objects to wait on, and before 3.13 multiprocessing's wait()
        # hands them to one WaitForMultipleObjects call, which takes at most 63.
        raise RanksError(f"{len(specs)} ranks on Windows need Python 3.13 or newer; this"
                         f" Python waits on at most {MAX_RANKS_WAITED} ranks")
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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _rank_environments(
    specs: list[RankSpec], extra: Mapping[str, str]
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
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
        "TORCHELASTIC_RUN_ID": f"ranks-{os.getpid()}-{time.monotonic_ns()}",
        "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
        "CUDA_VISIBLE_DEVICES": cuda_mask, "PYTHONUNBUFFERED": "1",
    }
    if size > 1:
        base.setdefault("OMP_NUM_THREADS", "1")  # as torchrun does: ranks share the cores
    if sys.platform.startswith("linux"):
        # One host: Gloo's and NCCL's own sockets stay on loopback unless the user says.
        base.setdefault("GLOO_SOCKET_IFNAME", "lo")
        base.setdefault("NCCL_SOCKET_IFNAME", "lo")
    if sys.platform == "win32":
        # torch's Windows builds have no libuv, yet their TCPStore asks for it by default:
        # code that calls init_process_group() itself (env://) fails without this
        # (pytorch/pytorch#139990).
        base.setdefault("USE_LIBUV", "0")
    frameworks = _frameworks.environments(specs, shared["MASTER_ADDR"], _free_port)
    envs = {}
    for spec in specs:
        env = {**base, **frameworks[spec.rank], **extra, **shared}
        env.update(RANK=str(spec.rank), LOCAL_RANK=str(spec.rank), ROLE_RANK=str(spec.rank))
        envs[spec.rank] = env
    return envs

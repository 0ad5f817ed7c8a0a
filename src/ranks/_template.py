"""The warm template: a clean process that has imported the kernel's modules once and forks
ranks from it.

Spawning an interpreter that imports torch costs seconds on every launch; forking the
kernel is fast but breaks once the kernel touched CUDA. The template is both: it is itself
*spawned* (never a fork of the kernel), imports the heavy modules the notebook uses, proves
that CUDA is not initialised in it (and in a forked probe), and then forks each rank on
request. A rank forked from it starts with torch imported and no CUDA state.

    kernel (Template)                              template process (serve)
      | spawn: python -c ...; pdeathsig, own session |
      | <--------------------- TemplateReady ------ |  after preloading and the CUDA check
      | -- Fork + fds [ctrl, out, err] -----------> |  fork(): the child becomes a rank
      | <-------------- Forked (pid) + fd [exit] -- |  exit pipe: the child's wait status
      | -- Configure, Preload (module names) -----> |  the notebook's newer imports
      | -- close (EOF) ---------------------------> |  exits once its ranks are gone

The messages are ``_template_protocol``'s.

One template per kernel, started at ``%load_ext ranks`` or once the first call's ranks are
up (``prestart``), never at import, closed at interpreter exit. No call waits for it to
start: until it is ready, ranks are spawned (``get_template``). It preloads what the kernel
imported, not what is installed. It dies with the kernel (a pidfd on the kernel, else the
parent-death signal; and EOF on its socket). Linux only: this is the start method
``template``, one of those ``_start`` chooses from.

A preload that would initialise CUDA or start a thread is dropped, logged, and the
template restarted without it: fork is only safe from a single-threaded, CUDA-free process.

When the template fails for a reason that may pass (too few fds, an environment too large
to exec, a template killed from outside), that call's ranks are spawned, a warning says so
once, and the template is tried again on a later call after a back-off (``_backoff``). Only
a template that is unsafe whatever it preloads is given up for the kernel's life.

A forked rank takes the kernel's environment as it is at the call (``_become_rank``), so a
change of ``os.environ`` needs no new template, except for the variables read once when an
interpreter starts or a preloaded library loads (``IMPORT_TIME_VARIABLES``). A change of
those, or an edit of a notebook module the template imported, replaces the template in the
background: calls spawn their ranks until the new one is ready, rather than wait for it.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib
import io
import logging
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping, Sequence
from multiprocessing.connection import wait
from typing import Any

from . import _runtime_dir
from . import _template_protocol as messages
from ._backoff import Backoff
from ._descendants import adopt_orphans, end_processes
from ._errors import TEMPLATE_ENDED
from ._lifeline import watch_parent
from ._notebook import kernel_environment
from ._placement import RankSpec
from ._spawn import (
    PACKAGE_PARENT,
    RankEnds,
    RankProcess,
    close_quietly,
    interrupt_held,
    spawn_rank,
)
from ._start import Request

log = logging.getLogger("ranks")

READY_TIMEOUT = 180.0  # importing torch on a cold disk can take a while
# What the template imports is what the kernel imported (``_kernel_modules``), never a
# library merely because it is installed: a notebook without torch gets a template, and
# ranks, without it. Where the kernel imported torch, these submodules come with it: ranks
# that use torch mostly call init_process_group and wrap a model in DDP, and importing
# them costs each spawned rank a further few hundred milliseconds the template pays once.
TORCH_COMPANIONS = ("torch.distributed", "torch.nn", "torch.nn.parallel")
# Modules that only make sense in the kernel, or that start threads when imported.
NEVER_PRELOAD = frozenset({
    "pydevd", "pydevd_plugins", "pydev_ipython", "pydevd_file_utils",
    "IPython", "ipykernel", "ipywidgets", "ipyparallel", "jupyter_client", "jupyter_core",
    "zmq", "tornado", "traitlets", "comm", "debugpy", "matplotlib_inline", "prompt_toolkit",
    "jedi", "parso", "pexpect", "ptyprocess", "pickleshare", "nest_asyncio", "anyio",
    "ranks", "psutil", "pytest", "_pytest", "pluggy", "wandb", "tensorboard", "ray",
})
_BOOT = (
    "import sys; sys.path.append({parent!r}); "
    "from ranks._template import serve; serve(sys.argv[1:])"
)



# --- kernel side -------------------------------------------------------------------------


class Template:
    """The kernel's handle on its template process.

    Not thread-safe by itself: the module's functions below hold ``_lock`` around every use,
    so Worlds started from several threads share one template safely.
    """

    def __init__(self, denied: Iterable[str] = ()) -> None:
        self.denied = set(denied)
        self.started = time.monotonic()
        self.report: dict[str, Any] = {}
        self.log_path = _template_log_path()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            boot = _BOOT.format(parent=PACKAGE_PARENT)
            with _runtime_dir.open_log(self.log_path) as log_file, \
                    interrupt_held() as interrupted:  # (as spawn_rank: no pid lost)
                self._popen = subprocess.Popen(
                    [sys.executable, "-c", boot, str(theirs.fileno()), str(os.getpid())],
                    stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                    pass_fds=(theirs.fileno(),), start_new_session=True,
                )
            if interrupted:
                self._popen.kill()
                self._popen.wait()
                raise KeyboardInterrupt
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self._closed = False
        self.live_ranks = 0  # forked and not yet reaped: a closed template waits for them
        self._ready = False
        self._sent_modules: set[str] = set()
        self._sources: dict[str, tuple[int, int] | None] = {}  # file -> its stamp when sent
        # The variables that took effect when the template started (see
        # IMPORT_TIME_VARIABLES): a rank forked from it would keep these values.
        self._environ = _import_time_environment()
        self.preload(_kernel_modules(self.denied))

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def alive(self) -> bool:
        """Running and in step with us (a request cut short leaves its reply unread)."""
        return not self._closed and self._popen.poll() is None

    def answered(self) -> bool:
        """Has the template said whether it started (without waiting for it)? RuntimeError
        when it has been silent too long: it will not start."""
        if self._ready or wait([self._sock], 0):
            return True
        if time.monotonic() - self.started > READY_TIMEOUT:
            raise RuntimeError(f"the ranks template did not start in {READY_TIMEOUT:g} s"
                               f" (its log: {self.log_path})")
        return False

    def wait_ready(self, deadline: float | None = None) -> None:
        """Block until the template has preloaded and checked itself; raise if it failed."""
        if self._ready:
            return
        reply, _ = self._recv(deadline, f"did not start in {READY_TIMEOUT:g} s")
        if not isinstance(reply, messages.TemplateReady):
            raise RuntimeError(f"the ranks template failed to start: {reply}")
        self.report = dict(reply.report)
        for module, why in self.report.get("skipped", {}).items():
            log.info("ranks template: not preloading %s (%s)", module, why)
        self._ready = True

    def preload(self, modules: Iterable[str]) -> None:
        """Ask the template to import these too, for the ranks forked after this."""
        new = sorted(set(modules) - self._sent_modules)
        if new:
            self._sent_modules.update(new)
            found: dict[str, bool] = {}  # top-level name -> found as the kernel's file
            for name in new:
                top = name.partition(".")[0]
                if top not in found:
                    found[top] = _found_again(top)
            new = [name for name in new if found[name.partition(".")[0]]]
            self._sources.update(_source_stamps(new))
            # The template imports them from the kernel's folder and sys.path as they are now,
            # and under its environment: a module that reads a variable at import gets the
            # value the kernel's import got.
            where = (tuple(sys.path), os.getcwd())
            try:
                self._send(messages.Configure(*where, kernel_environment()))
            except OSError as error:
                if error.errno != errno.EMSGSIZE:
                    raise
                # Too large (see fork_rank): it keeps the environment it has.
                self._send(messages.Configure(*where, None))
            self._send(messages.Preload(tuple(new)))

    def stale(self) -> bool:
        """Has a notebook module it imported changed on disk (an edit, a reload), or a
        variable read at start-up, since? A spawned rank would see the new state."""
        if _import_time_environment() != self._environ:
            return True
        return any(_stamp(path) != stamp for path, stamp in self._sources.items())

    def fork_rank(
        self, spec: RankSpec, env: Mapping[str, str], cwd: str, stacks_path: str,
        deadline: float | None,
    ) -> RankProcess:
        self.wait_ready(deadline)
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError("no time left to fork a rank")
        with RankEnds() as ends:
            sent = False
            request = messages.Fork(dict(env), cwd, stacks_path)
            try:
                messages.send(self._sock, request, ends.child_fds)
                sent = True
                # A request sent is answered at once (the template is ready): a reply a
                # little past the deadline is still worth taking, rather than giving the
                # template up for it.
                late = None if deadline is None else max(deadline, time.monotonic() + 2.0)
                reply, fds = self._recv(late, "did not fork a rank in time")
            except OSError as error:
                if not sent and error.errno == errno.EMSGSIZE:
                    # Larger than the socket's send buffer (net.core.wmem_default, 208 KiB
                    # by default): the environment, mostly. Nothing was sent: still in step.
                    size = len(pickle.dumps(request))
                    raise TooLargeToFork(f"the rank's environment is too large to send to"
                                         f" the ranks template ({size} bytes)") from error
                self.close()
                raise
            except BaseException:
                # Interrupted, or out of time, between the request and its reply: that
                # reply would answer our next request. Nobody uses this template again.
                self.close()
                raise
            if isinstance(reply, messages.Poisoned):
                raise TemplateUnsafe(reply.module, reply.why)
            if not isinstance(reply, messages.Forked) or len(fds) != 1:
                raise RuntimeError(f"the ranks template could not fork a rank: {reply}")
            exit_read = fds[0]
            self.live_ranks += 1

            def collect_status() -> int:
                self.live_ranks -= 1
                return _read_status(exit_read)

            return ends.handle(spec, reply.pid, exit_read, stacks_path, collect_status)

    def close(self) -> None:
        """Let the template go: it exits once the ranks it forked have exited."""
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()

    def _send(self, message: messages.ToTemplate) -> None:
        messages.send(self._sock, message)

    def _recv(
        self, deadline: float | None, late: str
    ) -> tuple[messages.ToKernel | messages.ToTemplate, list[int]]:
        """The next reply. TimeoutError when the caller's ``deadline`` passes first (the
        template may still answer later); RuntimeError when it does not answer at all."""
        ours = time.monotonic() + READY_TIMEOUT
        limit = ours if deadline is None else min(ours, deadline)
        if not wait([self._sock], max(0.0, limit - time.monotonic())):
            if limit < ours:
                raise TimeoutError(f"the ranks template {late}")
            raise RuntimeError(f"the ranks template did not answer in {READY_TIMEOUT:g} s"
                               f" (its log: {self.log_path})")
        reply, fds = messages.recv(self._sock)
        if reply is None:
            raise RuntimeError(f"the ranks template exited (its log: {self.log_path})")
        return reply, fds


# Variables (by prefix) read once, when an interpreter starts or a library the template
# preloads is loaded, not when a rank's code runs: a rank forked from a template started
# under other values would keep the old ones where a spawned rank would take the new.
#   PYTHON...                            the interpreter's start-up (hash seed, warnings, ...)
#   LD_..., MALLOC_..., GLIBC_TUNABLES   the dynamic loader and the allocator, at exec
#   OMP_, KMP_, GOMP_, MKL_, OPENBLAS_   thread pools, sized when numpy and torch load them
#   TORCH_, PYTORCH_                     torch's logging and JIT switches, at `import torch`
# Any other variable is read when the code that needs it runs, in the rank, after
# ``_become_rank`` set the kernel's environment (os.environ writes through to C's getenv):
# CUDA_VISIBLE_DEVICES and NCCL_* at CUDA/NCCL initialisation, which the template never
# does; MASTER_ADDR and the like at init_process_group. A module that reads one at import
# reads it in the kernel then too: the template preloads modules under the kernel's
# environment of that moment, so its ranks see what the kernel saw.
IMPORT_TIME_VARIABLES = ("PYTHON", "LD_", "MALLOC_", "GLIBC_TUNABLES", "OMP_", "KMP_", "GOMP_",
                         "MKL_", "OPENBLAS_", "TORCH_", "PYTORCH_")


def _import_time_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(IMPORT_TIME_VARIABLES)}


def _read_status(exit_read: int) -> int:
    """The rank's exit code from the template's report (as Popen.returncode would be)."""
    data = b""
    with contextlib.suppress(OSError):
        data = os.read(exit_read, 4)
    if len(data) < 4:
        # The template died before it could report: its ranks' watchers ended them.
        return TEMPLATE_ENDED
    return int(os.waitstatus_to_exitcode(struct.unpack("i", data)[0]))


def _kernel_modules(denied: set[str]) -> list[str]:
    """The kernel's imported third-party modules, worth importing in the template too."""
    stdlib: frozenset[str] = getattr(sys, "stdlib_module_names", frozenset())
    names = []
    for name, module in list(sys.modules.items()):
        top = name.partition(".")[0]
        if (top in stdlib or top in NEVER_PRELOAD or top in denied or top.startswith("_")
                or module is None or getattr(module, "__file__", None) is None):
            continue
        names.append(name)
    if "torch" in names:
        names.extend(TORCH_COMPANIONS)
    return sorted(set(names))


def _found_again(top: str) -> bool:
    """Would importing ``top`` afresh, from here and now, find the kernel's module's file?

    Not after an ``os.chdir`` or a ``sys.path`` edit that puts another file of the same name
    first (a ``helpers.py`` in two project folders): the template would import that one and
    its ranks run other code than the kernel. Left out, the module is imported by the rank
    when it needs it, from the file a spawned rank would find.
    """
    kernel_file = getattr(sys.modules.get(top), "__file__", None)
    if kernel_file is None:
        return True  # not imported in the kernel (TORCH_COMPANIONS): nothing to mix up
    for finder in sys.meta_path:  # importlib's own search, without the sys.modules cache
        try:
            spec = finder.find_spec(top, None)
        except Exception:  # a third-party finder that cannot answer: do not guess
            return False
        if spec is not None:
            origin = spec.origin
            return origin is not None and os.path.realpath(origin) == os.path.realpath(
                kernel_file)
    return False


def _source_stamps(names: Iterable[str]) -> dict[str, tuple[int, int] | None]:
    """The files of these modules and their stamps, installed packages aside.

    Only the notebook's own modules (local files, editable installs) are edited while the
    kernel runs; skipping site-packages keeps the check per call to a few stat calls.
    """
    paths = sysconfig.get_paths()
    installed = (paths["purelib"], paths["platlib"])
    stamps = {}
    for name in names:
        path = getattr(sys.modules.get(name), "__file__", None)
        if isinstance(path, str) and not path.startswith(installed):
            stamps[path] = _stamp(path)
    return stamps


def _stamp(path: str) -> tuple[int, int] | None:
    # The size too: an edit within the file system's mtime granularity still changes it.
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size


_template: Template | None = None
_denied: set[str] = set()  # top-level modules found unsafe to preload in this kernel


class TemplateUnsafe(RuntimeError):
    """A preload made the template unsafe to fork from; ``module`` names the culprit."""

    def __init__(self, module: str, why: str) -> None:
        super().__init__(f"preloading {module} made the template unsafe: {why}")
        self.module = module


class TooLargeToFork(Exception):
    """A rank's request did not fit in one message to the template; the template is fine."""


class TemplateUnavailable(RuntimeError):
    """No template can be safe in this kernel, whatever it leaves out: a cause that stays."""


def get_template(deadline: float | None = None) -> Template | None:
    """The kernel's template, ready to fork from; None while a new one starts.

    A call never waits for a template that is not ready: the first one, one after the last
    died, one that went stale and one tried again after failures all start in the
    background, and the caller spawns meanwhile (about what one template start costs, where
    waiting would add the template's imports to it). Calls after it fork once it answered.
    None without a template: ``prestart`` starts it, after the caller's ranks are up.
    """
    global _template
    if _template is not None and _template.alive:
        if _template.stale():
            # A rank forked from it would run a module, or keep a start-up variable, as
            # they were when the template imported it; a spawned rank sees them as they are.
            log.info("ranks template: a notebook module or a start-up variable changed;"
                     " starting a new one in the background")
        elif not _template.answered():
            return None
        else:
            _template.wait_ready(deadline)  # its reply is in: at once
            _template.preload(_kernel_modules(_template.denied))
            return _template
    close_template()
    # prestart() starts the next one once this call's ranks are up (Supervisor.start):
    # started now, its imports (torch: over a second of CPU) would slow their start.
    return None


def forget_unsafe(unsafe: TemplateUnsafe) -> None:
    """Leave the culprit out from now on and let the unsafe template go."""
    log.warning("ranks template: %s; starting a new one without it", unsafe)
    close_template()
    if unsafe.module == "(template)":
        raise TemplateUnavailable(str(unsafe)) from None
    _denied.add(unsafe.module.partition(".")[0])


_unavailable: str | None = None  # why no template can be safe in this kernel
_retry = Backoff()  # after failures that may pass
_lock = threading.RLock()  # Worlds may start from several threads; the template is one


def launch(
    requests: Sequence[Request], deadline: float | None, launched: Callable[[RankProcess], None],
) -> None:
    """Start ranks forked from the template, or spawned where it cannot fork (see the
    module's docstring); hand each to ``launched`` as soon as it runs. TimeoutError when
    ``deadline`` passes first."""
    wait_for_lock = -1.0 if deadline is None else max(0.0, deadline - time.monotonic())
    if not _lock.acquire(timeout=wait_for_lock):
        raise TimeoutError("another thread was starting ranks")
    try:
        template = _usable_template(deadline)
        failures = 0
        for spec, env, cwd, stacks_path in requests:
            while template is not None:
                try:
                    process = template.fork_rank(spec, env, cwd, stacks_path, deadline)
                    _recovered()
                    break
                except TooLargeToFork as error:
                    log.info("ranks: %s; starting the rank by spawn", error)
                    process = spawn_rank(spec, env, cwd, stacks_path)
                    break
                except TemplateUnsafe as unsafe:
                    _forget_or_give_up(unsafe)
                except TimeoutError:
                    raise
                except (RuntimeError, OSError) as error:
                    # The template died or broke under us: a fresh one, or spawn after two.
                    close_template()
                    failures += 1
                    if failures >= 2:
                        _failed(error)
                template = _usable_template(deadline)
            else:
                process = spawn_rank(spec, env, cwd, stacks_path)
            launched(process)
    finally:
        _lock.release()


def _forget_or_give_up(unsafe: TemplateUnsafe) -> None:
    try:
        forget_unsafe(unsafe)
    except TemplateUnavailable as error:  # the template itself is unsafe, whatever it preloads
        _give_up(error)


def _give_up(error: BaseException) -> None:
    global _unavailable
    _unavailable = str(error)
    log.warning("ranks: the warm template is unavailable (%s); ranks start by spawn in this"
                " kernel from now on", error)


def _failed(error: BaseException) -> None:
    """A failure that may pass: spawn until the back-off lets the template be tried again."""
    delay = _retry.failed(time.monotonic())
    if _retry.failures == 1:  # said once; the tries that fail again go to the log
        log.warning("ranks: the warm template failed (%s); ranks start by spawn (slower) and"
                    " the template is tried again in %g s, then less and less often",
                    error, delay)
    else:
        log.info("ranks template: failed again (%s); next try in %g s", error, delay)


def _recovered() -> None:
    if _retry.failures:
        log.info("ranks template: working again after %d failed start(s)", _retry.failures)
    _retry.succeeded()


def _usable_template(deadline: float | None) -> Template | None:
    """The template to fork from, or None for spawn: while the back-off runs after a failure,
    while a replacement starts, or when its start fails (twice, if the call waited for it)."""
    if _unavailable is not None:
        return None
    if (_template is None or not _template.alive) and not _retry.allows(time.monotonic()):
        return None
    try:
        return get_template(deadline)
    except TimeoutError:
        raise
    except (RuntimeError, OSError) as error:  # it failed to start: spawn, try again later
        close_template()
        _failed(error)
        return None


_closed_templates: list[Template] = []  # let go, still serving their last ranks


def close_template() -> None:
    """Let the template go (it exits once its ranks have); safe to call again."""
    global _template
    with _lock:
        if _template is not None:
            _template.close()
            _closed_templates.append(_template)
            _template = None
        settle_closed_templates()


def settle_closed_templates() -> None:
    """Reap the templates let go whose ranks have all ended: they exit at once then, and
    must not linger as zombie children of the kernel."""
    if not _lock.acquire(blocking=False):
        return  # another thread is launching: it settles them at its next close
    try:
        for template in _closed_templates:
            if template.live_ranks == 0:
                # It serves no one (an import it is still busy with would keep it for a
                # while otherwise).
                template._popen.kill()
                template._popen.wait()
        _closed_templates[:] = [t for t in _closed_templates if t._popen.poll() is None]
    finally:
        _lock.release()


def prestart() -> None:
    """Start the template now, without waiting for it, unless one runs (``%load_ext
    ranks``, and each start of ranks once they are up: see ``get_template``)."""
    global _template
    with _lock:
        if (_unavailable is not None or _template is not None
                or not _retry.allows(time.monotonic())):
            return
        _register_exit_hook()
        try:
            _template = Template(_denied)
        except OSError as error:  # too few fds, an environment too large to exec: may pass
            _failed(error)


_exit_hook_registered = False


def _register_exit_hook() -> None:
    """With the first template, not at import: importing ranks has no effects."""
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(close_template)
        _exit_hook_registered = True


def _template_log_path() -> str:
    """Where the template's own output goes (import errors, a crash): next to rank logs.
    Kept while the kernel lives (its errors point at it), removed with the rest at exit."""
    return os.path.join(_runtime_dir.process_dir(), "template.log")


# --- template side -----------------------------------------------------------------------


def serve(argv: list[str]) -> None:
    # What every rank runs, imported once here rather than after each fork (the rank side
    # and its debugger, which imports pdb: tens of milliseconds per rank otherwise).
    from . import _rank_pdb, _worker  # noqa: F401
    sock = socket.socket(fileno=int(argv[0]))
    kernel_gone = watch_parent(int(argv[1]))
    # What a rank started and left behind when it died comes to us, to be ended.
    adopt_orphans()
    kernel_fds = [] if kernel_gone is None else [kernel_gone]
    children: dict[int, int] = {}  # pid -> write end of its exit pipe
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)  # only to wake select
    ready_sent = False
    closing = False
    leftovers = False  # a rank ended: what it left came to us, to be ended once we are idle
    poisoned: messages.Poisoned | None = None  # once forking became unsafe
    while not (closing and not children):
        watched: list[int | socket.socket] = [wake_read, *kernel_fds, *([] if closing else [sock])]
        readable, _, _ = select.select(watched, [], [], SWEEP_DELAY if leftovers else None)
        if kernel_gone in readable:
            _end_leftovers(children)
            os._exit(0)  # the kernel died: our ranks' watchers see us go and take them down
        if not readable:
            _end_leftovers(children)
            leftovers = False
        if wake_read in readable:
            os.read(wake_read, 4096)
            leftovers = _reap(children) or leftovers
        if sock in readable:
            try:
                message, fds = messages.recv(sock)
            except OSError:
                message, fds = None, []
            if message is None:
                closing = True  # the kernel let go: leave once our ranks are gone
                continue
            if isinstance(message, messages.Configure):
                sys.path[:] = message.sys_path
                with contextlib.suppress(OSError):
                    os.chdir(message.cwd)
                if message.environment is not None:
                    os.environ.clear()
                    os.environ.update(message.environment)
            elif isinstance(message, messages.Preload) and poisoned is None:
                report = _preload(message.modules)
                if report.get("poisoned"):
                    poisoned = messages.Poisoned(report["poisoned"], report["why"])
                if not ready_sent:
                    closing = closing or not _answer(sock, messages.TemplateReady(report))
                    ready_sent = True
            elif isinstance(message, messages.Fork) and poisoned is not None:
                # Never fork from an unsafe process; keep serving our ranks until they end.
                for fd in fds:
                    os.close(fd)
                closing = closing or not _answer(sock, poisoned)
            elif isinstance(message, messages.Fork):
                ours = (wake_read, wake_write, *kernel_fds)
                pid, exit_read = _fork_rank(message, fds, sock, children, ours)
                # The kernel may have given up on this request (a timeout, an interrupt) and
                # closed its end: then we keep serving the ranks we have until they end.
                closing = closing or not _answer(sock, messages.Forked(pid), [exit_read])
                os.close(exit_read)
    if leftovers:
        _end_leftovers(children)


def _answer(sock: socket.socket, message: messages.ToKernel, fds: Sequence[int] = ()) -> bool:
    """Reply to the kernel; False when it has closed its end."""
    try:
        messages.send(sock, message, fds)
    except OSError:
        return False
    return True


def _preload(modules: Iterable[str]) -> dict[str, Any]:
    """Import what the notebook uses; stop at the first module that makes fork unsafe."""
    report: dict[str, Any] = {"skipped": {}}
    for name in modules:
        try:
            importlib.import_module(name)
        except BaseException as error:  # a module that fails to import is just skipped
            report["skipped"][name] = f"{type(error).__name__}: {error}"
            continue
        unsafe = _fork_hazard()
        if unsafe:
            report.update(poisoned=name, why=unsafe)
            return report
    hazard = _fork_hazard() or _probe_fork()
    if hazard:
        report.update(poisoned="(template)", why=hazard)
    return report


def _fork_hazard() -> str | None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        return "CUDA was initialised"
    if threading.active_count() > 1:
        return f"{threading.active_count() - 1} Python thread(s) were started"
    return None


def _probe_fork() -> str | None:
    """Fork once and check, in the child, that CUDA is not initialised there either."""
    pid = os.fork()
    if pid == 0:
        torch = sys.modules.get("torch")
        bad = torch is not None and (torch.cuda.is_initialized() or torch.cuda._is_in_bad_fork())
        os._exit(3 if bad else 0)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    return None if code == 0 else f"a forked probe saw CUDA state (exit code {code})"


def _reap(children: dict[int, int]) -> bool:
    """Collect our children that ended and report a rank's wait status to the kernel; True
    if a rank ended."""
    rank_ended = False
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        exit_write = children.pop(pid, None)  # None: something a rank left, now ended
        if exit_write is not None:
            rank_ended = True
            with contextlib.suppress(OSError):
                os.write(exit_write, struct.pack("i", status))
            os.close(exit_write)
    return rank_ended


# Looking for what ranks left waits until no rank has ended for this long: ranks of one
# call end together, and each must be reported without waiting for a look at /proc.
SWEEP_DELAY = 0.05


def _end_leftovers(children: dict[int, int]) -> None:
    """End what ranks that ended left behind: re-parented to us, the subreaper (see
    ``_descendants``). Resource trackers are spared: they clean up and exit once the rest
    is gone."""
    end_processes(below=[os.getpid()], spare=children.keys())


def _fork_rank(
    message: messages.Fork, fds: list[int], sock: socket.socket,
    children: dict[int, int], ours: tuple[int, ...],
) -> tuple[int, int]:
    env, cwd, stacks_path = message.env, message.cwd, message.stacks_path
    control_fd, out_write, err_write = fds
    exit_read, exit_write = os.pipe()
    template_pid = os.getpid()
    for stream in (sys.stdout, sys.stderr):  # nothing buffered here may reach a rank's output
        stream.flush()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for fd in [exit_read, exit_write, *ours, *children.values()]:
                close_quietly(fd)
            sock.close()
            _become_rank(env, cwd, out_write, err_write)
            from ._worker import main

            main([str(control_fd), str(template_pid), stacks_path], parent_adopts=True)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    for fd in fds:
        os.close(fd)
    children[pid] = exit_write
    return pid, exit_read


def _become_rank(env: Mapping[str, str], cwd: str, out_write: int, err_write: int) -> None:
    """Turn the forked child into what a freshly spawned rank would look like."""
    os.dup2(out_write, 1)
    os.dup2(err_write, 2)
    os.close(out_write)
    os.close(err_write)
    # As `python -u` would make them: the rank's output must stream live.
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(  # type: ignore[misc]
        io.FileIO(1, "w", closefd=False), write_through=True, line_buffering=True)
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(  # type: ignore[misc]
        io.FileIO(2, "w", closefd=False), write_through=True, line_buffering=True,
        errors="backslashreplace")
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    torch = sys.modules.get("torch")
    if torch is not None and env.get("OMP_NUM_THREADS", "").isdigit():
        # torch read OMP_NUM_THREADS when the template imported it, under another value.
        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    # Forked ranks would otherwise share the template's random state, where spawned ones
    # (and torchrun's workers) each start from their own: the same "random" init and
    # dropout on every rank. Python's random module reseeds itself after a fork.
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()
    if torch is not None:
        torch.seed()  # CUDA's generators are seeded lazily: this initialises no CUDA

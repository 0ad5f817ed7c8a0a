"""The chaos soak: a seeded random mix of every way a call can go wrong, in real kernels,
and nothing left behind afterwards.

Three kernels, one per start method (``RANKS_START_METHOD`` set when each starts), take a
third of the calls each, one after the other. Each call is one cell: a one-shot
``ranks.run`` or a call on the kernel's World, which lives until a rank of it dies. What
the call does is drawn from the table below; a call fails on its last rank while the
others wait to be stopped (``crashes.py`` holds that code):

    KIND             WHERE                    WHAT THE CELL MUST GET
    ok               run                      the results
    raise            load run dump kernel     crashes.Boom, the user's own type
    sys.exit         load run dump            ranks.RankCrashed
    os._exit         load run dump            ranks.RankCrashed
    segfault         load run dump            ranks.RankCrashed
    sigkill          load run dump            ranks.RankCrashed
    timeout          run (timeout=0.5)        ranks.RanksTimeout
    interrupt        run; the kernel is       KeyboardInterrupt
                     interrupted 0-0.6 s
                     into the cell
    template-kill    run; the template is     the results, or ranks.RankCrashed when the
                     SIGKILLed 0-0.8 s into   ranks it had forked die with it (they follow
                     the cell (template only) their parent); never anything else. The
                                              World's ranks it forked die too: the World
                                              is broken (below)
    unprintable      run: __str__ raises      its own type
    unpicklable      run: holds a lock        ranks.RankFailed (type, text and traceback)
    unpickles-wrong  run: rebuilds as None    ranks.RankFailed
  and on a World whose rank died, the next call (an extra call, not drawn):
    broken-world     run                      ranks.WorldBroken; then a new World starts

Each kernel is measured after a warm-up call and again after its last call: its child
processes (its one template aside), threads and fds must be where they started. After the
kernels have shut down, no rank or template is running, no ``/dev/shm`` entry is new and
nothing of ranks is left in the kernels' temporary folder (``TMPDIR`` and
``XDG_RUNTIME_DIR`` point into the test's own folder, so nothing else on the machine
counts; ``/dev/shm`` is the machine's: run the soak where nothing else makes segments
meanwhile, as CI does). Every call's outcome is checked; mismatches are collected and all
reported at the end with the traceback the cell got, and the figures (calls, outcomes by
type, time, leftovers), which are printed also when the soak passes.

Settings, from the environment:

    RANKS_SOAK_SEED   the seed (default: drawn at random; printed first, to reproduce a run)
    RANKS_SOAK_CALLS  how many calls (default 200, under three minutes in CI; the long
                      soak: RANKS_SOAK_CALLS=1000)
    RANKS_SOAK_KINDS  kinds to leave out ("-unprintable,-unpickles-wrong") or the only
                      kinds to draw ("ok,raise,timeout"); default: every kind

Below the soak, a focused test for each kind of failure it found, which fails fast and
every time where the soak fails only now and then.
"""

from __future__ import annotations

import ast
import contextlib
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import crashes
import psutil
import pytest
from kernel import Kernel
from processes import made_by_another_session, rank_processes

import ranks

TESTS = str(Path(__file__).resolve().parent)
METHODS = ("template", "spawn", "portable")
CALLS = int(os.environ.get("RANKS_SOAK_CALLS", "200"))
CELL_TIMEOUT = 30.0  # the slowest call stops its ranks in a few seconds
SETTLE = 10.0  # seconds for threads, fds and processes to be back after the last call


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


OK = "ok"
CRASHED = {_name(ranks.RankCrashed)}
# kind -> (wheres, weight, the outcomes the cell may get)
CASES: dict[str, tuple[tuple[str, ...], int, set[str]]] = {
    "ok": (("run",), 4, {OK}),
    "raise": (("load", "run", "dump", "kernel"), 2, {_name(crashes.Boom)}),
    "sys.exit": (("load", "run", "dump"), 1, CRASHED),
    "os._exit": (("load", "run", "dump"), 1, CRASHED),
    "segfault": (("load", "run", "dump"), 1, CRASHED),
    "sigkill": (("load", "run", "dump"), 1, CRASHED),
    "timeout": (("run",), 1, {_name(ranks.RanksTimeout)}),
    "interrupt": (("run",), 2, {_name(KeyboardInterrupt)}),
    "template-kill": (("run",), 2, {OK, *CRASHED}),
    "unprintable": (("run",), 1, {"__main__.Unprintable"}),
    "unpicklable": (("run",), 1, {_name(ranks.RankFailed)}),
    "unpickles-wrong": (("run",), 1, {_name(ranks.RankFailed)}),
}
BROKEN_WORLD = "broken-world"
EXPECTED = {kind: outcomes for kind, (_, _, outcomes) in CASES.items()}
EXPECTED[BROKEN_WORLD] = {_name(ranks.WorldBroken)}

# Defined in each kernel, as a notebook would: these functions and exception classes
# travel to the ranks by value.
SETUP = """
import os, sys, threading, time, traceback
sys.path.insert(0, {tests!r})
import crashes, psutil, ranks

class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("this exception cannot be printed")

class Unpicklable(Exception):
    def __init__(self):
        super().__init__("it holds a lock")
        self.lock = threading.Lock()

class UnpicklesWrong(Exception):
    def __reduce__(self):
        return (type(None), ())  # pickles, and comes back as None

RAISED = {{"unprintable": Unprintable, "unpicklable": Unpicklable,
          "unpickles-wrong": UnpicklesWrong}}

def raise_on_last(kind):
    if os.environ["RANK"] == str(int(os.environ["WORLD_SIZE"]) - 1):
        raise RAISED[kind]()
    crashes.wait()

def nap(seconds):
    time.sleep(seconds)
    return os.getpid()

def case(kind, where, seconds):
    if kind in ("ok", "template-kill", "broken-world"):
        return nap, (seconds,), {{}}
    if kind in RAISED:
        return raise_on_last, (kind,), {{}}
    if kind == "timeout":
        return crashes.wait, (), {{"timeout": 0.5}}
    if kind == "interrupt":
        return crashes.wait, (), {{}}
    return crashes.case(where, kind)

world = None

def call(kind, where, n, output, seconds, in_world, expected):
    global world
    fn, args, options = case(kind, where, seconds)
    try:
        if not in_world:
            results = ranks.run(fn, args, n=n, output=output, **options)
        elif kind == "broken-world":
            n = world.size
            try:
                results = world.run(fn, args)
            finally:
                world.close()
                world = None
        else:
            if world is None:
                world = ranks.World(n)
            n = world.size
            results = world.run(fn, args, output=output, **options)
    except BaseException as error:
        got = f"{{type(error).__module__}}.{{type(error).__qualname__}}"
        detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    else:
        # One result per rank, each from a rank's own process.
        got = "ok" if len(set(results)) == len(results) == n else f"wrong results {{results}}"
        detail = ""
    broken = world is not None and world.broken is not None
    return got, "" if got in expected else detail[-1200:], broken

def broken_after_kill(killed):
    # The World's ranks, if the killed template had forked them, follow it: wait for that.
    if world is None or not set(killed) & {{s.pid for s in world.status()}}:
        return None
    deadline = time.monotonic() + 5
    while world.broken is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return world.broken is not None

def is_template(process):
    try:
        return "ranks._template" in " ".join(process.cmdline())
    except psutil.Error:  # gone, or a zombie: not a running template
        return False

def describe():
    # What a difference in sample() is made of: the kernel's children and open files.
    children = []
    for c in psutil.Process().children(recursive=True):
        try:
            children.append((c.pid, c.status(), " ".join(c.cmdline())[:80]))
        except psutil.Error as error:
            children.append((c.pid, type(error).__name__, ""))
    return children, open_files()

def open_files():
    # IPython's history database opens its journal (and folder) on its own schedule.
    history = get_ipython().profile_dir.location
    fds = {{}}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{{name}}")
        except OSError:
            continue  # the listing's own fd
    return {{fd: path for fd, path in fds.items() if not path.startswith(history)}}

def sample():
    me = psutil.Process()
    kids = me.children(recursive=True)
    templates = [c for c in me.children() if is_template(c)]
    return {{
        "kernel children": len(kids) - len(templates),
        "templates": len(templates),
        "kernel threads": me.num_threads(),
        "kernel Python threads": threading.active_count(),
        # A template's socket comes and goes with the template.
        "kernel fds": len(open_files()) - len(templates),
    }}
"""


@dataclass(frozen=True)
class Call:
    method: str
    kind: str
    where: str
    in_world: bool
    n: int
    output: str
    seconds: float  # how long an "ok" or "template-kill" rank naps
    delay: float  # when the interrupt or the kill comes, after the cell started

    def code(self) -> str:
        return (f"call({self.kind!r}, {self.where!r}, {self.n}, {self.output!r},"
                f" {self.seconds!r}, {self.in_world}, {sorted(EXPECTED[self.kind])!r})")

    def __str__(self) -> str:
        return (f"{self.method} {'World' if self.in_world else 'run'} {self.kind}@{self.where}"
                f" n={self.n} output={self.output} seconds={self.seconds:.2f}"
                f" delay={self.delay:.2f}")


def chosen_kinds(setting: str) -> list[str]:
    """RANKS_SOAK_KINDS: "" for all, "-a,-b" to leave kinds out, "a,b" for only those."""
    names = [s.strip() for s in setting.split(",") if s.strip()]
    unknown = {name.lstrip("-") for name in names} - set(CASES)
    assert not unknown, f"RANKS_SOAK_KINDS names unknown kinds {sorted(unknown)}: {list(CASES)}"
    left_out = {name[1:] for name in names if name.startswith("-")}
    only = {name for name in names if not name.startswith("-")}
    return [kind for kind in CASES if kind not in left_out and (not only or kind in only)]


def plan(rng: random.Random, kinds: list[str], calls: int) -> list[Call]:
    """The calls, a third per start method; the template is killed only where there is one."""
    planned = []
    for index, method in enumerate(METHODS):
        count = calls // len(METHODS) + (index < calls % len(METHODS))
        drawn = [k for k in kinds if method == "template" or k != "template-kill"]
        for _ in range(count if drawn else 0):
            kind = rng.choices(drawn, [CASES[k][1] for k in drawn])[0]
            planned.append(Call(
                method, kind, rng.choice(CASES[kind][0]), in_world=rng.random() < 0.5,
                n=rng.choice((2, 3)), output=rng.choice(("all", "none")),
                seconds=rng.uniform(0.0, 0.5) if kind == "template-kill" else 0.0,
                delay=rng.uniform(0.0, 0.8 if kind == "template-kill" else 0.6),
            ))
    return planned


def kill_templates(kernel_pid: int) -> tuple[int, list[int]]:
    """SIGKILL the kernel's templates: how many, and the pids of the ranks they had forked."""
    killed, forked = 0, []
    for child in psutil.Process(kernel_pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if "ranks._template" in " ".join(child.cmdline()):
                forked += [c.pid for c in child.children()]
                child.send_signal(signal.SIGKILL)
                killed += 1
    return killed, forked


@dataclass
class Record:
    call: Call
    got: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.got in EXPECTED[self.call.kind]


def short(outcome: str) -> str:
    return outcome.rpartition(".")[2] if outcome != OK else OK


class Soak:
    """Runs the calls, kernel by kernel; keeps their records and what did not match."""

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.problems: list[str] = []
        self.leftovers: Counter[str] = Counter()
        self.templates_killed = 0
        self.kills_without_template = 0  # the template was off (or not started yet)

    def run(self, k: Kernel, calls: list[Call]) -> None:
        k.ok(SETUP.format(tests=TESTS))
        k.ok("ranks.run(nap, (0.0,), n=2)\nworld = ranks.World(2)\nworld.close()\nworld = None")
        before, (_, fds_before) = k.value("sample()"), k.value("describe()")
        for call in calls:
            broken = self.one(k, call)
            if broken:  # the World's next call, drawn or not, must say it is broken
                self.one(k, Call(call.method, BROKEN_WORLD, "run", True, call.n, "all", 0.0, 0))
        # The kernel still works, and keeps nothing of the calls.
        k.ok("if world is not None:\n    world.close()\nworld = None\nranks.run(nap, (0.0,), n=2)")
        after = k.value("sample()")
        deadline = time.monotonic() + SETTLE
        while _differs(before, after) and time.monotonic() < deadline:
            time.sleep(0.5)
            after = k.value("sample()")
        for key, value in after.items():
            if key != "templates":
                self.leftovers[key] += value - before[key]
        if _differs(before, after):
            children, fds = k.value("describe()")
            new_fds = {fd: path for fd, path in fds.items() if fds_before.get(fd) != path}
            self.problems.append(f"{calls[0].method} kernel: before {before}, after {after};"
                                 f" its children {children}, fds new since {new_fds}")

    def one(self, k: Kernel, call: Call) -> bool:
        """Run one call; True when it left the World broken."""
        killed: list[int] = []

        def kill() -> None:
            templates, forked = kill_templates(k.pid)
            self.templates_killed += templates
            self.kills_without_template += not templates
            killed.extend(forked)

        action: Callable[[], None] | None = {
            "interrupt": k.interrupt, "template-kill": kill}.get(call.kind)
        timers: list[threading.Timer] = []

        def on_start() -> None:
            if action is not None:
                timers.append(threading.Timer(call.delay, action))
                timers[-1].start()

        started = time.monotonic()
        try:
            cell = k.execute(call.code(), timeout=CELL_TIMEOUT, on_start=on_start)
        except TimeoutError as error:
            raise AssertionError(f"{call}: the cell hung\n{error}") from None
        for timer in timers:
            timer.join()  # a kill may come after the cell: the next calls meet a dead template
        broken, detail = False, ""
        if cell.error is not None:
            # Only an interrupt that landed outside call() reaches the cell itself.
            got = ("builtins." if cell.error["ename"] == "KeyboardInterrupt" else "cell: ") + \
                cell.error["ename"]
            if got != _name(KeyboardInterrupt):
                self.problems.append(f"{call}: the cell raised\n{cell.traceback}")
        else:
            assert cell.result is not None, cell
            got, detail, broken = ast.literal_eval(cell.result)
        if killed:  # also a one-shot call's kill: the World's ranks had the same parent
            [followed] = k.value(f"[broken_after_kill({killed!r})]")  # None is not displayed
            if followed is False:
                self.problems.append(f"{call}: the World's ranks outlived their template")
            broken = broken or bool(followed)
        record = Record(call, got, time.monotonic() - started)
        self.records.append(record)
        if not record.ok:
            expected = sorted(short(e) for e in EXPECTED[call.kind])
            self.problems.append(f"{call}: got {short(got)}, expected {' or '.join(expected)}"
                                 f"\n{detail}")
        return broken


def _differs(before: dict[str, int], after: dict[str, int]) -> bool:
    return any(after[key] != before[key] for key in before if key != "templates") or (
        after["templates"] > 1)


def _shm() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.iterdir()} if shm.exists() else set()


def _ranks_files(folder: Path) -> list[str]:
    """What ranks left under ``folder``: any path with "ranks" in it, the per-user root
    folder (``ranks-logs-<uid>`` and the like) aside while it is empty."""
    left = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if "ranks" not in str(relative):
            continue
        if path.is_dir() and len(relative.parts) <= 2 and not any(path.iterdir()):
            continue  # an empty folder of the user's own, kept for the next kernel
        left.append(str(relative))
    return left


@contextlib.contextmanager
def _kernel(folder: Path, method: str, tmp: Path) -> Iterator[Kernel]:
    workdir = folder / f"kernel-{method}"
    workdir.mkdir()
    env = {"RANKS_START_METHOD": method, "TMPDIR": str(tmp), "XDG_RUNTIME_DIR": str(tmp / "run"),
           "CRASH_DIR": str(folder / "crash")}
    k = Kernel(str(workdir), env)
    try:
        yield k
    finally:
        k.shutdown()


def figures(soak: Soak, seed: int, seconds: float, planned: int) -> str:
    """The soak's figures, for the log and for a closing note."""
    records = soak.records
    extra = sum(r.call.kind == BROKEN_WORLD for r in records)
    lines = [f"chaos soak: seed {seed}, {planned} calls (+{extra} on broken Worlds),"
             f" {seconds:.1f} s, {len(soak.problems)} problems"]
    lines.append(f"  {'start method':<14}{'calls':>7}{'one-shot':>10}{'World':>7}{'seconds':>9}")
    for method in METHODS:
        mine = [r for r in records if r.call.method == method]
        worlds = sum(r.call.in_world for r in mine)
        lines.append(f"  {method:<14}{len(mine):>7}{len(mine) - worlds:>10}{worlds:>7}"
                     f"{sum(r.seconds for r in mine):>9.1f}")
    lines.append(f"  {'kind':<17}{'calls':>6}  outcomes")
    for kind in [*CASES, BROKEN_WORLD]:
        mine = [r for r in records if r.call.kind == kind]
        if mine:
            got = Counter(short(r.got) for r in mine)
            lines.append(f"  {kind:<17}{len(mine):>6}  "
                         + ", ".join(f"{name} {count}" for name, count in got.most_common()))
    by_type = Counter(short(r.got) for r in records)
    lines.append("  outcomes by type: " + ", ".join(f"{n} {c}" for n, c in by_type.most_common()))
    lines.append(f"  templates killed: {soak.templates_killed}; kills that found none:"
                 f" {soak.kills_without_template}")
    lines.append("  leftovers: " + ", ".join(f"{k} {v}" for k, v in soak.leftovers.items()))
    return "\n".join(lines)


@pytest.mark.timeout(120 + 3 * CALLS)
def test_chaos_soak_leaves_nothing_and_every_call_gets_its_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    seed = int(os.environ.get("RANKS_SOAK_SEED") or random.SystemRandom().randrange(10**6))
    kinds = chosen_kinds(os.environ.get("RANKS_SOAK_KINDS", ""))
    with capsys.disabled():
        print(f"\nchaos soak: seed {seed} (RANKS_SOAK_SEED={seed} repeats it), {CALLS} calls,"
              f" kinds {kinds}", flush=True)
    calls = plan(random.Random(seed), kinds, CALLS)
    tmp = tmp_path / "tmp"
    (tmp / "run").mkdir(parents=True, mode=0o700)
    (tmp_path / "crash").mkdir()
    shm_before = _shm()
    soak = Soak()
    started = time.monotonic()
    kernels = []
    for method in METHODS:
        with _kernel(tmp_path, method, tmp) as k:
            kernels.append(k.pid)
            soak.run(k, [c for c in calls if c.method == method])
    seconds = time.monotonic() - started

    # Measured once the kernels are gone: what they would have removed at exit is gone too.
    def left_running() -> list[psutil.Process]:
        alive = [psutil.Process(pid) for pid in kernels if psutil.pid_exists(pid)]
        return [*alive, *rank_processes()]

    deadline = time.monotonic() + SETTLE
    while left_running() and time.monotonic() < deadline:
        time.sleep(0.2)
    soak.leftovers["processes after exit"] = len(left_running())
    new_shm = sorted(s for s in _shm() - shm_before if not made_by_another_session(s))
    soak.leftovers["/dev/shm"] = len(new_shm)
    left_files = _ranks_files(tmp)
    soak.leftovers["temp files"] = len(left_files)
    if soak.leftovers["processes after exit"]:
        soak.problems.append(f"processes left running: {left_running()}")
    if new_shm:
        soak.problems.append(f"/dev/shm entries left: {new_shm} (the kernels' pids:"
                             f" {dict(zip(METHODS, kernels, strict=False))})")
    if left_files:
        soak.problems.append(f"left in the temporary folder: {left_files}")
    report = figures(soak, seed, seconds, len(calls))
    with capsys.disabled():
        print(report, flush=True)
    assert not soak.problems, "\n".join([report, *soak.problems])


# --- what the soak found --------------------------------------------------------------------


@pytest.mark.timeout(90)
@pytest.mark.parametrize("start_method", ["spawn", "portable"])
def test_interrupts_while_ranks_start_leave_no_zombie(
    start_method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Interrupts aimed at the first 0.15 s of a call, while the kernel creates the ranks'
    processes, end every call and leave no zombie child in the kernel. (A KeyboardInterrupt
    raised as ``subprocess.Popen``'s fork_exec returns loses the child's pid: nobody could
    ever wait for it.)"""
    monkeypatch.setenv("RANKS_START_METHOD", start_method)
    rng = random.Random(0)
    interrupted = 0
    for _ in range(30):
        timer = threading.Timer(rng.uniform(0.0, 0.15), os.kill, (os.getpid(), signal.SIGINT))
        try:
            timer.start()
            ranks.run(crashes.wait, n=2, output="none")  # ends only by the interrupt
        except KeyboardInterrupt:
            interrupted += 1
        finally:
            timer.join()
    assert interrupted == 30
    zombies = [c.pid for c in psutil.Process().children()
               if c.status() == psutil.STATUS_ZOMBIE]
    assert zombies == [], f"children nobody waits for: {zombies}"

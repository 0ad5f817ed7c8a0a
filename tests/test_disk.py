"""What ranks writes to disk: only into a folder the user owns, and nothing left behind.

Each kernel here gets a temp folder of its own (TMPDIR), so a test sees exactly what its
kernels wrote. The "other user" is uid 65534 (nobody): the suite runs as root, which may
chown to it. The files an attacker plants are put where this version of ranks would write
and where earlier versions did (``ranks-logs-<uid>/template-of-kernel-<pid>.log``).
"""

from __future__ import annotations

import os
import re
import signal
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kernel import Kernel

import ranks

pytestmark = pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0,
                                reason="makes folders of another user: needs root")

UID = os.getuid() if hasattr(os, "getuid") else -1
OTHER_UID = 65534
KEEP_LOG_DIRS = 20  # ranks._output.KEEP_LOG_DIRS, not imported: tests run against any version


@pytest.fixture
def start_kernel(tmp_path: Path) -> Iterator[Callable[[Path], Kernel]]:
    """Start kernels whose temp folder is the given one; all closed at the end."""
    started: list[Kernel] = []

    def start(tmpdir: Path) -> Kernel:
        tmpdir.mkdir(exist_ok=True)
        kernel = Kernel(str(tmp_path), env={"TMPDIR": str(tmpdir)})
        started.append(kernel)
        return kernel

    yield start
    for kernel in started:
        kernel.close()


def other_users_folder(path: Path) -> Path:
    """A folder as another user who came first would leave it: theirs, open to all."""
    path.mkdir()
    os.chown(path, OTHER_UID, OTHER_UID)
    path.chmod(0o777)
    return path


def process_folder_name(pid: int) -> str:
    """The name ranks gives a process's folder: pid, start time, pid namespace."""
    started = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[19].decode()
    return f"{pid}-{started}-{os.stat('/proc/self/ns/pid').st_ino}"


def plant_at_template_logs(tmpdir: Path, kernel_pid: int,
                           plant: Callable[[Path], None]) -> list[Path]:
    """Where another user, owning the log roots, would put things for the kernel's
    template log: this version's place and the earlier one's."""
    roots = [other_users_folder(tmpdir / f"ranks-{UID}"),
             other_users_folder(tmpdir / f"ranks-logs-{UID}")]
    spots = [other_users_folder(roots[0] / process_folder_name(kernel_pid)) / "template.log",
             roots[1] / f"template-of-kernel-{kernel_pid}.log"]
    for spot in spots:
        plant(spot)
    return roots


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_log_root_made_by_another_user_is_not_trusted(tmp_path: Path, start_kernel) -> None:
    """Item 1: a root another user made first (0777) gets nothing of ours."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    roots = [other_users_folder(tmpdir / f"ranks-{UID}"),
             other_users_folder(tmpdir / f"ranks-logs-{UID}")]
    kernel = start_kernel(tmpdir)
    cell = kernel.ok("import ranks\nranks.run(lambda: print('secret output'), n=2)",
                     timeout=120)
    assert "secret output" in cell.stdout
    assert "ranks does not use" in cell.stderr  # a warning names the folder
    for root in roots:
        assert list(root.iterdir()) == [], f"ranks wrote into {root}"
    kernel.shutdown()
    assert everything_under(tmpdir) == sorted(r.name for r in roots)  # its own root: gone


@pytest.mark.timeout(200)
def test_symlink_planted_where_the_template_log_goes_is_not_followed(
    tmp_path: Path, start_kernel
) -> None:
    """Item 1: a symlink planted at the template log's name makes ranks create no file
    where it points."""
    tmpdir = tmp_path / "tmp"
    chosen = tmp_path / "made-where-another-user-chose"
    kernel = start_kernel(tmpdir)
    plant_at_template_logs(tmpdir, kernel.pid, lambda spot: spot.symlink_to(chosen))
    kernel.ok("import ranks\nranks.run(lambda: 1, n=1)", timeout=120)
    assert not chosen.exists()


@pytest.mark.timeout(200)
def test_fifo_planted_where_the_template_log_goes_does_not_hang_the_first_call(
    tmp_path: Path, start_kernel
) -> None:
    """Item 1: a FIFO at the template log's name would block its open forever."""
    tmpdir = tmp_path / "tmp"
    kernel = start_kernel(tmpdir)
    plant_at_template_logs(tmpdir, kernel.pid, lambda spot: os.mkfifo(spot, 0o666))
    cell = kernel.ok("import ranks\nranks.run(lambda: 7, n=1)", timeout=90)
    assert cell.result == "[7]"


def test_log_is_opened_without_following_a_symlink_or_blocking_on_a_fifo(
    tmp_path: Path
) -> None:
    """Item 1, in depth: even in our own folder a log is never opened through a symlink,
    and a FIFO fails its open at once."""
    from ranks import _runtime_dir

    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    (tmp_path / "link.log").symlink_to(victim)
    os.mkfifo(tmp_path / "fifo.log")
    for name in ("link.log", "fifo.log"):
        started = time.monotonic()
        with pytest.raises(OSError):
            _runtime_dir.open_log(str(tmp_path / name))
        assert time.monotonic() - started < 5
    assert victim.read_text() == "untouched"
    with _runtime_dir.open_log(str(tmp_path / "new.log")) as log:
        log.write(b"line\n")
    assert stat.S_IMODE((tmp_path / "new.log").stat().st_mode) == 0o600


NESTED = """
import os, ranks

def nested():
    import os, ranks
    ranks.run(lambda: print("from a nested rank"), n=1)
    return os.getpid()

rank_pid, = ranks.run(nested, n=1)
try:
    ranks.run(lambda: os._exit(3), n=1)
except ranks.RankCrashed:
    pass
with ranks.World(2) as w:
    w.exec("x = 1")
rank_pid
"""


@pytest.mark.timeout(200)
def test_nothing_of_ranks_remains_after_a_kernel_exits_normally(
    tmp_path: Path, start_kernel
) -> None:
    """Item 7: the template log, rank logs (of a failed call too) and the logs of a rank
    that ran ranks itself: all gone after a clean exit; the rank's as soon as it ended."""
    tmpdir = tmp_path / "tmp"
    kernel = start_kernel(tmpdir)
    rank_pid = kernel.value(NESTED, timeout=150)
    assert not [name for name in everything_under(tmpdir)
                if re.search(rf"(^|/|kernel-){rank_pid}-", name)]
    assert everything_under(tmpdir)  # the kernel's own are there while it lives
    kernel.shutdown()
    assert everything_under(tmpdir) == [f"ranks-{UID}"]


@pytest.mark.timeout(240)
def test_what_a_killed_kernel_left_is_removed_by_the_next_start(
    tmp_path: Path, start_kernel
) -> None:
    """Item 7: only the user's own folders of processes that are gone; never a live one's
    (a folder of a live pid with another start time is a reused pid: gone)."""
    tmpdir = tmp_path / "tmp"
    first = start_kernel(tmpdir)
    first.ok("import ranks\nranks.run(lambda: print('hello'), n=2)", timeout=120)

    def left_by(pid: int) -> list[str]:
        return [n for n in everything_under(tmpdir) if re.search(rf"(^|/|kernel-){pid}-", n)]

    killed = first.pid
    assert left_by(killed)
    os.kill(killed, signal.SIGKILL)
    first.manager.provisioner.process.wait(10)  # type: ignore[union-attr]
    first.close()
    assert left_by(killed)  # nobody could remove them yet

    root = tmpdir / f"ranks-{UID}"
    root.mkdir(mode=0o700, exist_ok=True)
    live = root / process_folder_name(os.getpid())
    live.mkdir()
    reused = root / (process_folder_name(os.getpid()).replace("-", "-1", 1))
    reused.mkdir()
    gone_pid = 4_194_304  # Linux's PID_MAX_LIMIT: never a process's pid
    namespace = os.stat("/proc/self/ns/pid").st_ino
    not_ours = root / f"{gone_pid}-1-{namespace}"
    not_ours.mkdir()
    os.chown(not_ours, OTHER_UID, OTHER_UID)

    second = start_kernel(tmpdir)
    second.ok("import ranks\nranks.run(lambda: 1, n=1)", timeout=120)
    assert not left_by(killed)
    assert live.exists() and not_ours.exists()
    assert not reused.exists()


LOW_FDS = """
import os, resource, ranks
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
outcomes = []
for extra in range(40):
    in_use = len(os.listdir("/proc/self/fd"))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + extra, hard))
        ranks.run(int, n=1)
        outcomes.append("ok")
        break
    except Exception as error:
        outcomes.append(type(error).__name__)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
outcomes
"""


@pytest.mark.timeout(300)
def test_world_start_that_fails_early_leaves_no_temp_folder(
    tmp_path: Path, start_kernel
) -> None:
    """Item 7: a start that fails (EMFILE) at any step leaves no World temp folder (stack
    files, rendezvous) behind while the kernel lives; logs stay, as for any failed call."""
    tmpdir = tmp_path / "tmp"
    kernel = start_kernel(tmpdir)
    kernel.ok("import ranks\nranks.run(int, n=1)", timeout=120)  # the template, warm
    outcomes = kernel.value(LOW_FDS, timeout=240)
    assert outcomes[-1] == "ok" and len(outcomes) > 1, outcomes
    roots = {f"ranks-{UID}", f"ranks-logs-{UID}"}
    temp_folders = [
        name for name in everything_under(tmpdir)
        if (tmpdir / name).is_dir() and Path(name).name not in roots
        and re.match(r"(ranks-|tmp-)", Path(name).name)
    ]
    assert temp_folders == [], outcomes


FAILED_CALLS = """
import os, re, ranks

def crash():
    import os, ranks
    rank = ranks.current().rank
    print(f"rank {rank} was here", flush=True)
    if rank == 1:
        os._exit(3)
    import time
    time.sleep(30)

try:
    ranks.run(crash, n=2)
except ranks.RankCrashed as error:
    crashed = str(error)
try:
    ranks.run(lambda: __import__("time").sleep(30), n=1, timeout=3)
except ranks.RanksTimeout as error:
    timed_out = "\\n".join([*getattr(error, "__notes__", []), str(error)])
for _ in range(KEEP + 2):  # newer Worlds would push out the logs of successful ones
    ranks.run(int, n=1)
crashed, timed_out
"""


@pytest.mark.timeout(300)
def test_logs_of_a_failed_call_stay_while_the_kernel_lives_and_the_error_names_them(
    tmp_path: Path, start_kernel
) -> None:
    """Item 7: RankCrashed names the rank's full log, a timeout the folder of all of them;
    both outlive newer Worlds until the kernel exits."""
    tmpdir = tmp_path / "tmp"
    kernel = start_kernel(tmpdir)
    crashed, timed_out = kernel.value(FAILED_CALLS.replace("KEEP", str(KEEP_LOG_DIRS)),
                                      timeout=240)
    found = re.search(r"(/\S+rank-1\.log)", crashed)
    assert found, crashed
    assert Path(found.group(1)).read_text() == "rank 1 was here\n"
    folder = re.search(rf"({re.escape(str(tmpdir))}/\S+)", timed_out)
    assert folder, timed_out
    assert Path(folder.group(1)).is_dir()
    kernel.shutdown()
    assert not Path(found.group(1)).exists()


@pytest.mark.timeout(120)
def test_an_open_worlds_logs_outlive_any_number_of_newer_worlds() -> None:
    """Only closed Worlds' log folders are pushed out by newer ones: an open World's ranks
    write to theirs until it closes (found by the chaos soak)."""
    from ranks import _output

    with ranks.World(n=1) as world:
        for _ in range(_output.KEEP_LOG_DIRS + 2):
            ranks.run(int, n=1, output="none")
        world.run(print, args=("still logged",))
        assert "still logged" in Path(world.log_path(0)).read_text()

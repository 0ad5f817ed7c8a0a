"""The one place on disk that ranks writes to: a folder only the user can reach.

    <temp folder>/ranks-<uid>/        the user's root, made 0700
        <pid>-<start>-<pidns>/        one process's: a kernel, or a rank that runs ranks itself
            template.log              the warm template's own output (``_template``)
            world-<n>-XXXXXX/         one World's rank logs, rank-<i>.log (``_output``)
            tmp-XXXXXX/               one World's stack dumps and FileStore rendezvous;
                                      removed when the World closes (``_supervisor``)

Trust: the root is reused only if ``lstat`` shows a real folder (not a symlink), owned by
the user, with no group or other access: the check pytest makes of its ``pytest-of-<user>``
root (``_pytest/tmpdir.py``). A root that fails (another local user made it first, to read
the ranks' output or to plant a symlink or a FIFO where ranks writes) is not used: a
warning names it, and this process takes a fresh root from ``mkdtemp`` (left to the
system's temp cleaning if the process is killed). pytest stops there instead; ranks goes
on, or anyone could turn it off for a user by making that folder first. Below the root
every name is made fresh (``mkdir``, ``mkdtemp``), and logs are opened without following a
symlink and without blocking on a FIFO (:func:`open_log`).

Clean-up: a process removes its folder when it ends: at interpreter exit (a finalizer), or,
in a rank, which ends with ``os._exit``, just before that (``_worker``). A killed process
cannot: the first World of a later process of the same user removes the folders of
processes that are gone. The folder's name says whose it is: the pid, the process's start
time (a reused pid has another) and its pid namespace (a container sharing the temp
folder has other processes under the same pids). Where the start time cannot be read
(macOS, Windows: no /proc), nothing is removed that way; the system's temp cleaning takes
what killed kernels left.

Windows has no uids and no mode bits to check: its temp folder is the user's own already,
so there only the not-a-symlink check applies.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import stat
import tempfile
import threading
import warnings
import weakref
from collections.abc import Iterable
from typing import IO

_HAS_UIDS = hasattr(os, "getuid")
# O_NOFOLLOW: a planted symlink fails the open (ELOOP) instead of sending our writes where
# another user chose; O_NONBLOCK: a planted FIFO fails it (ENXIO, no reader) instead of
# blocking forever. Neither exists on Windows, where the folder is private anyway.
# O_BINARY: Windows would turn "\n" into "\r\n" in the logs.
_LOG_FLAGS = (os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0)
              | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))

_lock = threading.Lock()
_folder: str | None = None
_owner: int | None = None  # the pid _folder belongs to: a forked child makes its own
_fallback_root: str | None = None  # this process's own root, when the shared one was refused
_exit_hook_for: int | None = None


class _Anchor:
    """Lives as long as the module: what the exit finalizer hangs on."""


_exit_anchor = _Anchor()


def process_dir() -> str:
    """This process's private folder, made on first use (the first World or template)."""
    global _folder, _owner, _fallback_root, _exit_hook_for
    with _lock:
        pid = os.getpid()
        if _folder is not None and _owner == pid:
            return _folder
        _fallback_root = None
        root = _user_root()
        if root is None:
            root = _fallback_root = tempfile.mkdtemp(prefix=f"ranks-{_user()}-")
        else:
            remove_leftovers(root)
        path = os.path.join(root, _process_name(pid))
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            # Our own name in our own root: where start times cannot be read (macOS,
            # Windows), that of a killed process whose pid we got. Ours to reuse, if it is
            # a folder of ours.
            problem = _untrusted(path)
            if problem is not None:
                raise RuntimeError(f"ranks cannot use {path}: {problem}") from None
        _folder, _owner = path, pid
        if _exit_hook_for != pid:  # with the first use, not at import
            # A finalizer, not atexit: at exit finalizers run newest first, so every World
            # (each closed by its own finalizer, made after this one) has closed, and
            # written its last output, before its logs go.
            weakref.finalize(_exit_anchor, remove_process_dir)
            _exit_hook_for = pid
        return path


def new_dir(prefix: str) -> str:
    """A fresh private folder in this process's folder."""
    return tempfile.mkdtemp(prefix=prefix, dir=process_dir())


def open_log(path: str) -> IO[bytes]:
    """Open ``path`` to append to, made 0600 if new; never through a symlink, never
    blocking on a FIFO, and only if it is a regular file."""
    fd = os.open(path, _LOG_FLAGS, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"ranks will not write its log to {path}: not a regular file")
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)  # O_NONBLOCK was for the open only
        return os.fdopen(fd, "ab")
    except BaseException:
        os.close(fd)
        raise


def remove_dir(path: str, files: Iterable[str]) -> None:
    """Remove the folder ``path``, its ``files`` known by name first: unlink and rmdir take
    no fd, so this works out of fds too (EMFILE), where rmtree, which must open the folder
    to list it, fails. rmtree takes what else it holds."""
    for file in files:
        with contextlib.suppress(OSError):
            os.unlink(file)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def remove_process_dir() -> None:
    """Remove everything this process wrote (at exit; a rank calls it before ``os._exit``)."""
    global _folder
    with _lock:
        if _folder is None or _owner != os.getpid():
            return  # never a parent's, from a forked child
        shutil.rmtree(_fallback_root or _folder, ignore_errors=True)
        _folder = None


def remove_leftovers(root: str) -> None:
    """Remove the folders of this user's processes that are gone (killed, so they could
    not remove their own); never a live process's, never another user's."""
    namespace = _pid_namespace()
    if namespace is None:
        return  # no /proc: a live process cannot be told from a gone one
    with contextlib.suppress(OSError), os.scandir(root) as entries:
        for entry in entries:
            owner = _parse_name(entry.name)
            if owner is None or owner[2] != namespace:
                continue
            pid, started, _ = owner
            with contextlib.suppress(OSError):
                if pid == os.getpid() or _start_time(pid) == started:
                    continue  # alive (the same pid started at another time is another)
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid():
                    shutil.rmtree(entry.path, ignore_errors=True)


def process_tag() -> str:
    """This process's name for what it leaves outside its folder (``_dataplane``'s folders
    on /dev/shm): ``<pid>-<start>-<pidns>``, as its folder here is named."""
    return _process_name(os.getpid())


def tag_is_gone(tag: str) -> bool:
    """Whether the process :func:`process_tag` named is gone; False where that cannot be
    told (no /proc, another pid namespace, a name not made by ranks)."""
    owner = _parse_name(tag)
    namespace = _pid_namespace()
    if owner is None or namespace is None or owner[2] != namespace:
        return False
    pid, started, _ = owner
    return pid != os.getpid() and _start_time(pid) != started


def user_root_path() -> str:
    """Where the user's root is (whether or not it exists or is trusted)."""
    return os.path.join(tempfile.gettempdir(), f"ranks-{_user()}")


def _user_root() -> str | None:
    """The user's root, made if missing; None if it exists and cannot be trusted."""
    path = user_root_path()
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    problem = _untrusted(path)
    if problem is None:
        return path
    warnings.warn(
        f"ranks does not use {path}: {problem}, so another user could read the ranks'"
        " output there or plant files where ranks writes. This process writes to a fresh"
        " private folder instead (removed at exit). Remove that folder, unless it is yours"
        " and you meant it: then `chmod 700` it.", RuntimeWarning, stacklevel=4)
    return None


def _untrusted(path: str) -> str | None:
    """Why ``path`` is not a folder only this user can reach, or None if it is."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a folder"
    if _HAS_UIDS:
        if info.st_uid != os.getuid():
            return f"it belongs to uid {info.st_uid}, not to this user ({os.getuid()})"
        if info.st_mode & 0o077:
            return f"other users can reach it (mode {stat.S_IMODE(info.st_mode):o})"
    return None


def _user() -> str:
    # Windows has no uid; its temp folder is per user already, the name only tells apart.
    return str(os.getuid()) if _HAS_UIDS else getpass.getuser()


def _process_name(pid: int) -> str:
    return f"{pid}-{_start_time(pid) or 'x'}-{_pid_namespace() or 'x'}"


def _parse_name(name: str) -> tuple[int, str, str] | None:
    pid, _, rest = name.partition("-")
    started, _, namespace = rest.partition("-")
    if not (pid.isdigit() and started.isdigit() and namespace.isdigit()):
        return None
    return int(pid), started, namespace


def _start_time(pid: int) -> str | None:
    """When the process started (clock ticks after boot, /proc/<pid>/stat); None if it is
    gone or there is no /proc. Any other failure (EMFILE) raises: a live process must never
    be taken for a gone one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            data = stat_file.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2, the command name, may hold spaces and parentheses: count after its last ")".
    fields = data.rpartition(b")")[2].split()
    if len(fields) <= 19 or fields[0] == b"Z":
        return None  # a zombie is gone: it holds nothing, and only its exit status remains
    return fields[19].decode()


def _pid_namespace() -> str | None:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return None

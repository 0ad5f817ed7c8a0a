"""Windows job objects: a rank's process tree, ended as one and ended with the kernel.

What a session and ``killpg`` are for a rank on POSIX, a job object is on Windows. Every
process the rank starts joins its job (Windows puts children in their parent's job), so
:meth:`Job.kill` ends the rank with its DataLoader workers. The job is made with
``JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE`` and only the kernel holds a handle to it (job
handles are not inherited): when the kernel exits, however it exits, Windows closes that
handle and ends every process in the job. That is the rank's lifeline on Windows.

Windows only: importing it elsewhere fails at the assert below.
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from ctypes import wintypes

from ._errors import ENDED_BY_RANKS

assert sys.platform == "win32"

_KILL_ON_JOB_CLOSE = 0x2000  # JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
_EXTENDED_LIMIT_INFORMATION = 9  # JobObjectExtendedLimitInformation


class _IoCounters(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulonglong) for name in (
        "ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
        "ReadTransferCount", "WriteTransferCount", "OtherTransferCount",
    )]


class _BasicLimits(ctypes.Structure):
    _fields_ = [
        ("PerProcessUserTimeLimit", ctypes.c_int64),
        ("PerJobUserTimeLimit", ctypes.c_int64),
        ("LimitFlags", wintypes.DWORD),
        ("MinimumWorkingSetSize", ctypes.c_size_t),
        ("MaximumWorkingSetSize", ctypes.c_size_t),
        ("ActiveProcessLimit", wintypes.DWORD),
        ("Affinity", ctypes.c_size_t),
        ("PriorityClass", wintypes.DWORD),
        ("SchedulingClass", wintypes.DWORD),
    ]


class _ExtendedLimits(ctypes.Structure):
    _fields_ = [
        ("BasicLimitInformation", _BasicLimits),
        ("IoInfo", _IoCounters),
        ("ProcessMemoryLimit", ctypes.c_size_t),
        ("JobMemoryLimit", ctypes.c_size_t),
        ("PeakProcessMemoryUsed", ctypes.c_size_t),
        ("PeakJobMemoryUsed", ctypes.c_size_t),
    ]


_kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
_kernel32.CreateJobObjectW.argtypes = [ctypes.c_void_p, wintypes.LPCWSTR]
_kernel32.CreateJobObjectW.restype = wintypes.HANDLE
_kernel32.SetInformationJobObject.argtypes = [
    wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD]
_kernel32.SetInformationJobObject.restype = wintypes.BOOL
_kernel32.AssignProcessToJobObject.argtypes = [wintypes.HANDLE, wintypes.HANDLE]
_kernel32.AssignProcessToJobObject.restype = wintypes.BOOL
_kernel32.TerminateJobObject.argtypes = [wintypes.HANDLE, wintypes.UINT]
_kernel32.TerminateJobObject.restype = wintypes.BOOL
_kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
_kernel32.CloseHandle.restype = wintypes.BOOL


def _check(ok: int, what: str) -> None:
    if not ok:
        raise ctypes.WinError(ctypes.get_last_error(), f"{what} failed")


class Job:
    """One rank's job object; :meth:`close` ends whatever of the tree is still running."""

    def __init__(self) -> None:
        handle = _kernel32.CreateJobObjectW(None, None)
        _check(handle, "CreateJobObjectW")
        self._handle: int | None = handle
        limits = _ExtendedLimits()
        limits.BasicLimitInformation.LimitFlags = _KILL_ON_JOB_CLOSE
        try:
            _check(_kernel32.SetInformationJobObject(
                handle, _EXTENDED_LIMIT_INFORMATION, ctypes.byref(limits),
                ctypes.sizeof(limits)), "SetInformationJobObject")
        except BaseException:
            self.close()
            raise

    @classmethod
    def for_process(cls, popen: subprocess.Popen[bytes]) -> Job:
        """A job holding ``popen``'s process. The rank starts processes of its own only
        after the kernel's Init, so none escapes the job by starting before it (as long as
        ``popen`` is the interpreter itself: see ``_portable._interpreter`` for venvs)."""
        job = cls()
        try:
            _check(_kernel32.AssignProcessToJobObject(job._handle, int(popen._handle)),
                   "AssignProcessToJobObject")
        except BaseException:
            job.close()
            popen.kill()
            popen.wait()
            raise
        return job

    def kill(self) -> None:
        """End every process in the job now; the job stays usable (and empty)."""
        if self._handle is not None:
            _kernel32.TerminateJobObject(self._handle, ENDED_BY_RANKS)

    def close(self) -> None:
        """Let go of the job: Windows ends every process still in it."""
        if self._handle is not None:
            handle, self._handle = self._handle, None
            _kernel32.CloseHandle(handle)

"""The messages between the kernel and its template (``ranks._template_protocol``): typed,
framed one per packet, with the fds they hand over beside them. The template itself is
tested in test_template.py."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from ranks import _template_protocol as messages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="the template is Linux's")


def test_a_fork_request_arrives_whole_with_its_fds() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    read_end, write_end = os.pipe()
    try:
        request = messages.Fork({"RANK": "1"}, "/somewhere", "/tmp/stacks-1.txt")
        messages.send(ours, request, [write_end])
        messages.send(ours, messages.Preload(("numpy",)))
        received, fds = messages.recv(theirs)
        assert received == request and len(fds) == 1
        os.write(fds[0], b"x")  # the same pipe, handed over
        os.close(fds[0])
        assert os.read(read_end, 1) == b"x"
        assert messages.recv(theirs) == (messages.Preload(("numpy",)), [])
    finally:
        for fd in (read_end, write_end):
            os.close(fd)
        ours.close()
        theirs.close()


def test_the_other_end_closing_reads_as_none() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with theirs:
        ours.close()
        assert messages.recv(theirs) == (None, [])

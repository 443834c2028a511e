"""Processes of their own for jobs: a fork server, framed messages, dying with the parent.

A job under a hard time limit runs in a child process the worker can kill.
Forking the worker itself is not safe: it holds gRPC (etcd) channels and
threads, which must not cross a fork (the child could inherit a lock taken
by a thread that does not exist there, or share gRPC's polling state with
its parent). So the worker forks one *fork server* when it starts, before
it opens any connection or starts any thread but its keep-alive; the fork
server holds no connection and runs one thread, and forks each job's
process from that clean state. A job process makes its own connections, as
backends are per (process, thread).

Every process here dies with its parent: the fork server when its worker
dies (even by SIGKILL: ``PR_SET_PDEATHSIG``, and the end of its control
socket), a job process when the fork server does. None is left behind.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from contextlib import suppress
from typing import Any

from packmule.errors import PackmuleError

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_LENGTH = struct.Struct("!I")

# What a job process runs: its end of the socket to the worker; it must not return
# normally before it has said so on that socket (the fork server then exits it).
ChildMain = Callable[[socket.socket], None]


def die_with_parent(parent: int, signum: int = signal.SIGKILL) -> None:
    """Have the kernel send ``signum`` to this process when its parent dies (Linux).

    Called right after a fork: if the parent ``parent`` is already gone,
    exit now, since the kernel would never send the signal.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


def send(sock: socket.socket, message: dict[str, Any], payload: bytes = b"") -> None:
    """Send one frame: a JSON object, then ``payload`` raw (a job body, not re-encoded)."""
    head = json.dumps(message, separators=(",", ":")).encode()
    sock.sendall(_LENGTH.pack(len(head)) + head + _LENGTH.pack(len(payload)) + payload)


def receive(sock: socket.socket, timeout: float | None) -> tuple[dict[str, Any], bytes] | None:
    """The next frame sent by :func:`send`; None at the end of the stream.

    Raises TimeoutError if no frame begins within ``timeout`` seconds (None:
    wait); nothing is consumed then. A frame once begun is read whole.
    """
    sock.settimeout(timeout)
    if not sock.recv(1, socket.MSG_PEEK):
        return None
    sock.settimeout(None)
    message = json.loads(_read(sock, _LENGTH.unpack(_read(sock, _LENGTH.size))[0]))
    return message, _read(sock, _LENGTH.unpack(_read(sock, _LENGTH.size))[0])


def _read(sock: socket.socket, size: int) -> bytes:
    """Exactly ``size`` bytes."""
    chunks, missing = [], size
    while missing:
        chunk = sock.recv(min(missing, 1 << 20))
        if not chunk:
            raise ConnectionError("the other process closed its socket mid-frame")
        chunks.append(chunk)
        missing -= len(chunk)
    return b"".join(chunks)


def describe_exit(returncode: int) -> str:
    """An exit in words: ``exited with code 3``, ``killed by signal SIGKILL``.

    ``returncode`` as Popen has it (``os.waitstatus_to_exitcode``): ``-N`` for signal N.
    """
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        return f"killed by signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


class ForkServer:
    """Forks job processes from a clean copy of the worker made at its start.

    Not thread-safe: the worker's job loop is its only user.
    """

    def __init__(self, child_main: ChildMain) -> None:
        self._child_main = child_main
        self._control: socket.socket | None = None
        self.pid = 0

    def start(self) -> None:
        """Fork the server now: call before opening connections or starting threads."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            ours.close()
            try:
                _serve(theirs, parent, self._child_main)
            finally:
                os._exit(0)
        theirs.close()
        self._control, self.pid = ours, pid

    def spawn(self) -> tuple[int, socket.socket]:
        """A new job process: its pid and the worker's end of its socket."""
        control = self._started()
        ours, theirs = socket.socketpair()
        try:
            socket.send_fds(control, [b"fork"], [theirs.fileno()])
        finally:
            theirs.close()  # the job process holds the only other copy: its death is our EOF
        reply = control.recv(64)
        if not reply.startswith(b"pid "):
            ours.close()
            raise PackmuleError(f"the fork server failed to fork a job process: {reply!r}")
        return int(reply[4:]), ours

    def reap(self, pid: int, *, kill: bool) -> int:
        """Wait for job process ``pid`` (killing it first if ``kill``); its exit code (-N: signal N).

        The fork server reaps its children only when asked, so ``pid`` cannot
        be reused by another process before this call: the kill hits the right one.
        """
        if kill:
            os.kill(pid, signal.SIGKILL)
        control = self._started()
        control.send(b"reap %d" % pid)
        return int(control.recv(64))

    def stop(self) -> None:
        """Stop the fork server (closing its socket ends it) and wait for it."""
        if self._control is not None:
            self._control.close()
            self._control = None
            os.waitpid(self.pid, 0)

    def _started(self) -> socket.socket:
        if self._control is None:
            raise PackmuleError("the fork server is not running")
        return self._control


def _serve(control: socket.socket, parent: int, child_main: ChildMain) -> None:
    """The fork server's loop: fork on request, reap on request, end with the worker."""
    die_with_parent(parent)
    for signum in (signal.SIGINT, signal.SIGTERM):  # the worker decides when a job stops
        signal.signal(signum, signal.SIG_IGN)
    while True:
        message, fds, _flags, _address = socket.recv_fds(control, 64, 1)
        if not message:
            return  # the worker closed its end, or died
        if message == b"fork":
            _fork_job(control, fds[0], child_main)
        elif message.startswith(b"reap "):
            _, status = os.waitpid(int(message[5:]), 0)
            control.send(b"%d" % os.waitstatus_to_exitcode(status))


def _fork_job(control: socket.socket, fd: int, child_main: ChildMain) -> None:
    server = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            control.close()
            die_with_parent(server)
            child_main(socket.socket(fileno=fd))
            code = 0
        except BaseException:  # the process ends here: say why first
            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with suppress(Exception):
                    stream.flush()
            os._exit(code)
    os.close(fd)
    control.send(b"pid %d" % pid)

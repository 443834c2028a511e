"""Sockets that time out in the kernel, for every client packmule opens.

A Python socket with a timeout polls before each send and each receive:
two extra system calls per round trip, a sixth of a job's CPU on loopback.
These sockets stay in blocking mode with ``SO_RCVTIMEO``/``SO_SNDTIMEO``
set instead, and turn the kernel's "would block" into ``TimeoutError``, so
a silent server still fails within the timeout and says so (greenstalk
would otherwise read the empty result as "Unexpected EOF").
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from packmule.config import Address

_socket = socket.socket  # its methods called directly: super() makes an object per call


class TimedSocket(socket.socket):
    """A blocking socket whose sends and receives give up after ``seconds``."""

    def set_kernel_timeout(self, seconds: float, *, coalesce: bool = False) -> None:
        """Block at most ``seconds`` in any one send or receive.

        ``coalesce`` keeps Nagle's algorithm on: writes made while earlier
        ones are unacknowledged leave together. For a producer's puts, which
        never wait for their replies one by one: a loop of single enqueues
        then costs the kernel, and beanstalkd, a packet per few dozen jobs,
        not one per job (a write is held back at most until the last one is
        acknowledged, which beanstalkd's reply does at once). Every other
        connection waits for each reply, and sends at once.
        """
        self.settimeout(None)
        whole = int(seconds)
        timeval = struct.pack("ll", whole, int((seconds - whole) * 1_000_000))
        self.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        self.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0 if coalesce else 1)

    def recv(self, *args: Any) -> bytes:
        try:
            return _socket.recv(self, *args)
        except BlockingIOError as err:
            raise TimeoutError("no reply within the socket timeout") from err

    def recv_into(self, *args: Any) -> int:
        try:
            return _socket.recv_into(self, *args)
        except BlockingIOError as err:
            raise TimeoutError("no reply within the socket timeout") from err

    def sendall(self, *args: Any) -> None:
        try:
            _socket.sendall(self, *args)
        except BlockingIOError as err:
            raise TimeoutError("the server took no data within the socket timeout") from err


def connect(address: Address, seconds: float, *, coalesce: bool = False) -> TimedSocket:
    """A TCP connection to ``address`` (IPv4 or IPv6), connected within ``seconds``.

    ``coalesce``: see :meth:`TimedSocket.set_kernel_timeout`.
    """
    host, port = address
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        sock = TimedSocket(family, kind, proto)
        try:
            sock.settimeout(seconds)
            sock.connect(sockaddr)
            sock.set_kernel_timeout(seconds, coalesce=coalesce)
            return sock
        except OSError as err:
            sock.close()
            error = err
    raise error or OSError(f"no address found for {host}")


class KernelTimedSockets:
    """The ``socket`` module as pymemcache uses it (its ``socket_module``).

    pymemcache connects with its ``connect_timeout`` and then sets its
    ``timeout`` (None here, so blocking); the kernel timeout set at creation
    stays in force.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def socket(self, *args: Any) -> TimedSocket:
        sock = TimedSocket(*args)
        sock.set_kernel_timeout(self.seconds)
        return sock

    def __getattr__(self, name: str) -> Any:
        return getattr(socket, name)

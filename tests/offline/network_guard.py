"""Refuse every connection that leaves this machine, in the test process and in every process it starts.

Tests start ``dvc``, ``torchrun``, the stage scripts and ``cxr-predict`` as subprocesses. The
``sitecustomize`` module beside this file installs the guard in each of them: the test session
puts this folder on ``PYTHONPATH``, and Python imports ``sitecustomize`` at startup. A refused
attempt raises :class:`NetworkAccessError` and is appended to the file named by
``CXR_NETWORK_LOG``, so an attempt that the code under test catches and ignores (an update
check, a retry loop) still fails the test that caused it.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

LOG_VARIABLE = "CXR_NETWORK_LOG"


class NetworkAccessError(RuntimeError):
    """Raised instead of reaching the network; not an OSError, so no retry loop mistakes it for a flaky link."""


def is_loopback(host: object) -> bool:
    """Whether ``host`` (a name or an address) stays on this machine."""
    if host is None:
        return True
    name = host.decode() if isinstance(host, bytes) else str(host)
    if name.lower() in ("localhost", "localhost.localdomain", "") or name == socket.gethostname():
        return True  # this machine's own name resolves locally (torchrun's rendezvous asks for it)
    try:
        return ipaddress.ip_address(name.split("%")[0]).is_loopback
    except ValueError:
        return False


def refuse(what: str, record: bool) -> None:
    """Raise; with ``record``, first append the attempt to the file ``CXR_NETWORK_LOG`` names."""
    message = f"test tried to reach the network: {what} (pid {os.getpid()}: {' '.join(sys.argv)[:200]})"
    log = os.environ.get(LOG_VARIABLE)
    if log and record:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(message + "\n")
    raise NetworkAccessError(message)


def _inet(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


def guarded(patch: Callable[[Any, str, Any], None], record: bool = True) -> None:
    """Install the guard through ``patch(owner, name, replacement)`` (``setattr``, or pytest's monkeypatch).

    ``record`` logs each refusal. The test process itself does not: its tests provoke refusals
    on purpose to check the offline errors users see, and the exception already fails any other.
    """
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_sendto, real_getaddrinfo = socket.socket.sendto, socket.getaddrinfo

    def connect(sock: socket.socket, address: Any) -> None:
        if _inet(sock) and not is_loopback(address[0]):
            refuse(f"connect {address!r}", record)
        return real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        if _inet(sock) and not is_loopback(address[0]):
            refuse(f"connect {address!r}", record)
        return real_connect_ex(sock, address)

    def sendto(sock: socket.socket, data: bytes, *args: Any) -> int:
        address = args[-1]
        if _inet(sock) and not is_loopback(address[0]):
            refuse(f"sendto {address!r}", record)
        return real_sendto(sock, data, *args)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_loopback(host):
            refuse(f"resolve {host!r}", record)
        return real_getaddrinfo(host, *args, **kwargs)

    patch(socket.socket, "connect", connect)
    patch(socket.socket, "connect_ex", connect_ex)
    patch(socket.socket, "sendto", sendto)
    patch(socket, "getaddrinfo", getaddrinfo)

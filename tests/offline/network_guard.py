"""Refuse every connection that leaves this machine, in the test process and in every process it starts.

Tests start ``dvc``, ``torchrun``, the stage scripts and ``cxr-predict`` as subprocesses. The
``sitecustomize`` module beside this file installs the guard in each of them: the test session
puts this folder on ``PYTHONPATH``, and Python imports ``sitecustomize`` at startup. A refused
attempt raises :class:`NetworkAccessError` and is appended to the file named by
``CXR_NETWORK_LOG``, so an attempt that the code under test catches and ignores (an update
check, a retry loop) still fails the test that caused it.

The guard needs Python's cooperation (``python -I``, a cleaned environment or a non-Python
child escapes it), so ``make test`` also runs the suite in a network namespace of its own
(``isolated`` beside this file); this guard is what remains where namespaces are not allowed.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

LOG_VARIABLE = "CXR_NETWORK_LOG"
_NAME_LOOKUPS = ("gethostbyname", "gethostbyname_ex", "gethostbyaddr", "getnameinfo")
"""Name-service calls besides ``getaddrinfo``: each sends a DNS query for a name that is not local."""


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


def refuse(what: str) -> None:
    """Append the attempt to the file ``CXR_NETWORK_LOG`` names, then raise."""
    message = f"test tried to reach the network: {what} (pid {os.getpid()}: {' '.join(sys.argv)[:200]})"
    log = os.environ.get(LOG_VARIABLE)
    if log:
        with open(log, "a", encoding="utf-8") as handle:
            handle.write(message + "\n")
    raise NetworkAccessError(message)


def _inet(sock: socket.socket) -> bool:
    return sock.family in (socket.AF_INET, socket.AF_INET6)


def guarded(patch: Callable[[Any, str, Any], None]) -> None:
    """Install the guard through ``patch(owner, name, replacement)`` (``setattr``, or pytest's monkeypatch).

    Each refusal is logged, so one that the code under test catches still fails the test; a test
    that provokes refusals on purpose points ``CXR_NETWORK_LOG`` at a log of its own.
    """
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_sendto, real_getaddrinfo = socket.socket.sendto, socket.getaddrinfo
    real_lookups = {name: getattr(socket, name) for name in _NAME_LOOKUPS}

    def connect(sock: socket.socket, address: Any) -> None:
        if _inet(sock) and not is_loopback(address[0]):
            refuse(f"connect {address!r}")
        return real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        if _inet(sock) and not is_loopback(address[0]):
            refuse(f"connect {address!r}")
        return real_connect_ex(sock, address)

    def sendto(sock: socket.socket, data: bytes, *args: Any) -> int:
        address = args[-1]
        if _inet(sock) and not is_loopback(address[0]):
            refuse(f"sendto {address!r}")
        return real_sendto(sock, data, *args)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not is_loopback(host):
            refuse(f"resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    def lookup(name: str) -> Callable[..., Any]:
        def resolve(host: Any, *args: Any) -> Any:
            target = host[0] if isinstance(host, tuple) else host  # getnameinfo takes (address, port)
            if not is_loopback(target):
                refuse(f"{name} {target!r}")
            return real_lookups[name](host, *args)
        return resolve

    for name in _NAME_LOOKUPS:
        patch(socket, name, lookup(name))
    patch(socket.socket, "connect", connect)
    patch(socket.socket, "connect_ex", connect_ex)
    patch(socket.socket, "sendto", sendto)
    patch(socket, "getaddrinfo", getaddrinfo)

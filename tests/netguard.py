"""A pytest plugin that keeps tests on loopback: any socket connect/send to another address fails the test.

Use the `netguard` fixture (or `pytestmark = pytest.mark.usefixtures("netguard")`). While it is active:

* `socket.socket.connect`/`connect_ex`/`sendto`/`sendmsg` to an IPv4/IPv6 address that is not loopback (and to
  a host *name*, which the C library would resolve on its own) raise `NetGuardViolation` (an `OSError`, so the
  code under test sees an ordinary connection failure) and the test fails at teardown even if the code under
  test swallowed the error;
* `socket.getaddrinfo`/`gethostbyname` answer only address literals, `localhost`, and the fake names a test
  registers with `netguard.add_host("images.example", "10.0.0.5")`; any other name is a violation, because a
  real lookup would send a packet to a DNS server. Faking a name that points at a private address is how tests
  exercise the fetch policy without ever sending a packet there.

Only Python-level sockets are guarded: a C extension that opens its own sockets (librdkafka) is not.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_sendto = socket.socket.sendto
_real_sendmsg = socket.socket.sendmsg
_real_getaddrinfo = socket.getaddrinfo
_real_gethostbyname = socket.gethostbyname


class NetGuardViolation(OSError):
    """A test tried to reach beyond loopback."""


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; False for names and everything else."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


class NetGuard:
    def __init__(self) -> None:
        self.violations: list[str] = []
        self.lookups: list[str] = []
        self.connects: list[tuple[str, int]] = []
        self._hosts: dict[str, list[str]] = {"localhost": ["127.0.0.1"]}

    def add_host(self, name: str, *addresses: str) -> None:
        """Make `name` resolve to `addresses` (any addresses: connecting to a non-loopback one still fails)."""
        self._hosts[name.lower().rstrip(".")] = list(addresses)

    # -- checks --------------------------------------------------------------------------------------

    def _violation(self, what: str) -> NetGuardViolation:
        self.violations.append(what)
        return NetGuardViolation(f"netguard: {what} (tests may only use loopback)")

    def check_destination(self, sock: socket.socket, address: Any, action: str) -> None:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return  # unix sockets and the like never leave the machine
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        host = str(host)
        if not is_loopback(host):
            raise self._violation(f"{action} to {address!r}")
        if action == "connect":
            self.connects.append((host, int(address[1])))

    def resolve(self, host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0) -> Any:
        name = host.decode("ascii", "replace") if isinstance(host, bytes) else host
        if name is None or _is_literal(str(name)):
            return _real_getaddrinfo(host, port, family, type, proto, flags)
        key = str(name).lower().rstrip(".")
        self.lookups.append(key)
        if key not in self._hosts:
            raise self._violation(f"DNS lookup of {name!r}")
        numeric_port = int(port) if port not in (None, "") else 0
        results = []
        for address in self._hosts[key]:
            ip = ipaddress.ip_address(address)
            fam = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            if family not in (0, socket.AF_UNSPEC, fam):
                continue
            sockaddr: tuple[Any, ...] = (address, numeric_port)
            if fam == socket.AF_INET6:
                sockaddr = (address, numeric_port, 0, 0)
            results.append((fam, type or socket.SOCK_STREAM, proto or socket.IPPROTO_TCP, "", sockaddr))
        if not results:
            raise socket.gaierror(socket.EAI_NONAME, "no address of the requested family")
        return results

    # -- installation --------------------------------------------------------------------------------

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        guard = self

        def connect(sock: socket.socket, address: Any) -> None:
            guard.check_destination(sock, address, "connect")
            return _real_connect(sock, address)

        def connect_ex(sock: socket.socket, address: Any) -> int:
            guard.check_destination(sock, address, "connect")
            return _real_connect_ex(sock, address)

        def sendto(sock: socket.socket, data: Any, *args: Any) -> int:
            guard.check_destination(sock, args[-1], "sendto")
            return _real_sendto(sock, data, *args)  # type: ignore[call-arg]

        def sendmsg(sock: socket.socket, buffers: Any, *args: Any) -> int:
            if len(args) >= 3 and args[2] is not None:
                guard.check_destination(sock, args[2], "sendmsg")
            return _real_sendmsg(sock, buffers, *args)

        def gethostbyname(host: str) -> str:
            return str(guard.resolve(host, 0, socket.AF_INET)[0][4][0])

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket.socket, "sendto", sendto)
        monkeypatch.setattr(socket.socket, "sendmsg", sendmsg)
        monkeypatch.setattr(socket, "getaddrinfo", guard.resolve)
        monkeypatch.setattr(socket, "gethostbyname", gethostbyname)


@pytest.fixture
def netguard(monkeypatch: pytest.MonkeyPatch) -> Iterator[NetGuard]:
    """Fail the test on any attempt to reach a non-loopback address; fake DNS names with `add_host`."""
    guard = NetGuard()
    guard.install(monkeypatch)
    yield guard
    if guard.violations:
        pytest.fail("netguard: the test tried to leave loopback:\n  " + "\n  ".join(guard.violations))

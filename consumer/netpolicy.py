"""Is this URL, or this address, one the fetcher may connect to? Pure functions of their input: no I/O.

Hand-written on purpose: the SSRF libraries at hand check a URL's host once, not every address a name resolves to
on every redirect hop, pinned for the connection (consumer/fetch.py), nor the numeric spellings below.

Image URLs are written by strangers, so the fetcher must never be turned against the network it runs in
(server-side request forgery). The rules:

* only `http` and `https`; no user-info (`http://a@host/`), no control characters, spaces or backslashes, which
  different URL parsers read differently;
* a host that is a number in any spelling a resolver accepts (`2130706433`, `0177.0.0.1`, `0x7f.1`, `127.1`) is
  normalised to the address the socket would use, checked, and then refused anyway unless it was spelled in the
  canonical dotted-quad form: no legitimate image URL needs octal;
* every address (the literal one, or every one a name resolves to) must be a public unicast address, unless
  `allow_private` or `allow_cidrs` say otherwise; IPv6 forms that embed an IPv4 address (mapped, compatible,
  NAT64, 6to4, Teredo) are judged by the IPv4 address they carry.

`check_url` returns a `Target` whose `url` is rebuilt from the parsed parts, so the URL the HTTP client sees is
the URL that was checked; `normalise_url` gives that same URL to the cache, for its keys.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import idna

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

MAX_URL_CHARS = 2048
ALLOWED_SCHEMES = {"http": 80, "https": 443}


class Refused(Exception):
    """The URL or address may not be fetched; `reason` is a short, bounded label (used in metrics)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Target:
    """A checked URL. `host` is the ASCII host name or the address (no brackets); `ip` is set for literals."""

    url: str
    scheme: str
    host: str
    port: int
    ip: IPAddress | None


def _nets(*cidrs: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(cidr) for cidr in cidrs)


# Explicit tables rather than `ipaddress`'s is_private/is_global, whose answers changed between Python releases.
# Order matters only for the reason reported.
_V4_REFUSED: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = (
    ("unspecified", _nets("0.0.0.0/8")),
    ("loopback", _nets("127.0.0.0/8")),
    ("private", _nets("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")),
    ("shared", _nets("100.64.0.0/10")),
    ("link_local", _nets("169.254.0.0/16")),
    ("multicast", _nets("224.0.0.0/4")),
    (
        "reserved",
        _nets(
            "192.0.0.0/24",  # IETF protocol assignments
            "192.0.2.0/24",  # documentation
            "192.88.99.0/24",  # 6to4 relay anycast (deprecated)
            "198.18.0.0/15",  # benchmarking
            "198.51.100.0/24",  # documentation
            "203.0.113.0/24",  # documentation
            "240.0.0.0/4",  # reserved, and 255.255.255.255 broadcast
        ),
    ),
)

_V6_REFUSED: tuple[tuple[str, tuple[IPNetwork, ...]], ...] = (
    ("unspecified", _nets("::/128")),
    ("loopback", _nets("::1/128")),
    ("private", _nets("fc00::/7", "fec0::/10", "64:ff9b:1::/48")),  # ULA, site-local, local-use NAT64
    ("link_local", _nets("fe80::/10")),
    ("multicast", _nets("ff00::/8")),
    ("reserved", _nets("100::/64", "2001:db8::/32", "3fff::/20", "5f00::/16")),
)

# Refused even when private addresses are allowed: they never name one unicast host.
_ALWAYS_REFUSED = {"unspecified", "multicast"}

_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_MAPPED_V6 = ipaddress.ip_network("::ffff:0:0/96")
_COMPATIBLE_V6 = ipaddress.ip_network("::/96")
_NAT64_V6 = ipaddress.ip_network("64:ff9b::/96")
_IETF_V6 = ipaddress.ip_network("2001::/23")  # holds Teredo (2001::/32) and other special-purpose blocks
_TEREDO_V6 = ipaddress.ip_network("2001::/32")


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address would reach, through the kernel or a translator."""
    if ip in _MAPPED_V6:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip in _COMPATIBLE_V6 or ip in _NAT64_V6:
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip in _TEREDO_V6 and ip.teredo is not None:
        server, client = ip.teredo
        return [server, client]
    return []


class AddressPolicy:
    """Which addresses and URLs the fetcher may use. Build once from settings; thread-safe (immutable)."""

    def __init__(self, allow_private: bool = False, allow_cidrs: Sequence[IPNetwork] = ()) -> None:
        self.allow_private = allow_private
        self.allow_cidrs = tuple(allow_cidrs)

    # -- addresses ---------------------------------------------------------------------------------

    def check_ip(self, ip: IPAddress | str) -> str | None:
        """None when `ip` may be connected to; otherwise the reason it is refused."""
        if isinstance(ip, str):
            try:
                ip = _parse_ip_text(ip)
            except Refused as exc:
                return exc.reason
        category = self._category(ip)
        if category is None:
            return None
        if category in _ALWAYS_REFUSED:
            return category
        if self._allow_listed(ip):
            return None
        if category == "embedded" and isinstance(ip, ipaddress.IPv6Address):
            # Judge the carried IPv4 address, allow-list included (::ffff:10.1.2.3 with 10.0.0.0/8 allowed).
            for v4 in _embedded_ipv4(ip):
                reason = self.check_ip(v4)
                if reason is not None:
                    return reason
            return None
        if self.allow_private:
            return None
        return category

    def check_addresses(self, addresses: Iterable[IPAddress | str]) -> str | None:
        """None when every address is allowed (a name that resolves to one bad address is refused)."""
        seen = False
        for address in addresses:
            seen = True
            reason = self.check_ip(address)
            if reason is not None:
                return reason
        return None if seen else "no_address"

    def _allow_listed(self, ip: IPAddress) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allow_cidrs)

    @staticmethod
    def _category(ip: IPAddress) -> str | None:
        """The refused category `ip` falls in, "embedded" for IPv6 carrying IPv4, or None for public unicast."""
        if isinstance(ip, ipaddress.IPv4Address):
            for reason, networks in _V4_REFUSED:
                if any(ip in net for net in networks):
                    return reason
            return None
        for reason, networks in _V6_REFUSED:
            if any(ip in net for net in networks):
                return reason
        if ip in _MAPPED_V6 or ip in _COMPATIBLE_V6 or ip in _NAT64_V6:
            return "embedded"
        if ip.sixtofour is not None or (ip in _TEREDO_V6 and ip.teredo is not None):
            return "embedded"
        if ip in _IETF_V6 or ip not in _GLOBAL_UNICAST_V6:
            return "reserved"
        return None

    # -- URLs --------------------------------------------------------------------------------------

    def check_url(self, url: str) -> Target:
        """Parse and check `url`; raise `Refused` when it may not be fetched.

        A host name is not resolved here (no I/O): the caller resolves `Target.host` and passes every address
        to `check_addresses`. An address literal is checked now.
        """
        target = parse_url(url)
        if target.ip is not None:
            reason = self.check_ip(target.ip)
            if reason is not None:
                raise Refused(reason, target.host)
        return target


# -- parsing ---------------------------------------------------------------------------------------

_FORBIDDEN_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*$")
_NUMERIC_LABEL = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")


def parse_url(url: str) -> Target:
    """Split `url`, normalise its host and rebuild it; raise `Refused` for anything unsafe or ambiguous."""
    if not isinstance(url, str) or not url:
        raise Refused("invalid_url", "empty")
    if len(url) > MAX_URL_CHARS:
        raise Refused("invalid_url", "too long")
    if _FORBIDDEN_CHARS.search(url):
        # urlsplit silently drops tabs and newlines, and a backslash is a path separator to browsers but part
        # of the user-info to others: refuse rather than guess which reading the server would make.
        raise Refused("invalid_url", "control character, space or backslash")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise Refused("invalid_url", str(exc)) from None
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise Refused("scheme", scheme or "none")
    if "@" in parts.netloc:
        raise Refused("userinfo")
    if port is None:
        if parts.netloc.endswith(":"):
            raise Refused("invalid_port", "empty")
        port = ALLOWED_SCHEMES[scheme]
    if not 1 <= port <= 65535:
        raise Refused("invalid_port", str(port))
    host, ip = normalise_host(_host_part(parts.netloc))

    authority = f"[{host}]" if isinstance(ip, ipaddress.IPv6Address) else host
    if port != ALLOWED_SCHEMES[scheme]:
        authority = f"{authority}:{port}"
    path = parts.path or "/"
    rebuilt = f"{scheme}://{authority}{path}" + (f"?{parts.query}" if parts.query else "")
    return Target(url=rebuilt, scheme=scheme, host=host, port=port, ip=ip)


def normalise_url(url: str) -> str | None:
    """The one normal form of an image URL: the URL the fetcher requests (`parse_url(url).url`: scheme and host
    lower-cased, the host IDNA-encoded, a default port and the fragment dropped), from which the cache makes its
    keys too; None for a URL the policy refuses to parse (never fetched, so never cached). Two URLs with one normal
    form are one request; no character is dropped on the way (tabs and newlines are refused, not stripped)."""
    try:
        return parse_url(url).url
    except Refused:
        return None


def _host_part(netloc: str) -> str:
    """The host of an authority without user-info: "[v6]" keeps its brackets, the port is dropped."""
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0 or netloc[end + 1 :] not in ("",) and not re.fullmatch(r":[0-9]*", netloc[end + 1 :]):
            raise Refused("invalid_host", netloc)
        return netloc[: end + 1]
    return netloc.rsplit(":", 1)[0] if ":" in netloc else netloc


def normalise_host(raw_host: str) -> tuple[str, IPAddress | None]:
    """(ASCII host, address or None) for the host part of a URL; raise `Refused` for an ambiguous host."""
    if raw_host.startswith("["):
        if not raw_host.endswith("]") or "]" in raw_host[:-1]:
            raise Refused("invalid_host", raw_host)
        inner = raw_host[1:-1]
        if "%" in inner:
            raise Refused("invalid_host", "IPv6 zone identifiers are not allowed")
        try:
            v6 = ipaddress.IPv6Address(inner)
        except ValueError:
            raise Refused("invalid_host", raw_host) from None
        return v6.compressed, v6
    if not raw_host:
        raise Refused("invalid_host", "empty")
    if "%" in raw_host:
        raise Refused("invalid_host", "percent-encoded host")
    try:
        # UTS #46 mapping also folds full-width and circled digits ("①②⑦.0.0.1") to ASCII before we look.
        ascii_host = idna.encode(raw_host, uts46=True).decode("ascii") if not raw_host.isascii() else raw_host
    except idna.IDNAError:
        raise Refused("invalid_host", "not a valid international domain name") from None
    ascii_host = ascii_host.lower()
    v4 = parse_ipv4_number(ascii_host)
    if v4 is not None:
        canonical = str(v4)
        if ascii_host != canonical:
            # Check first so that the reason says "loopback" for 0x7f.1, then refuse the odd spelling anyway.
            reason = AddressPolicy._category(v4)
            raise Refused(reason if reason else "noncanonical_ip", f"{ascii_host} is {canonical}")
        return canonical, v4
    name = ascii_host[:-1] if ascii_host.endswith(".") else ascii_host
    if not _HOST_NAME.match(name):
        raise Refused("invalid_host", ascii_host)
    return name, None


def parse_ipv4_number(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address `host` means to a resolver (inet_aton / WHATWG rules), None if it is a name.

    A host whose last label is numeric is an address or nothing: `1.2.3.4.5` and `0x.0xg` are refused, never
    sent to DNS, because resolvers disagree about them.
    """
    labels = host.split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()  # one trailing dot: "127.0.0.1." is 127.0.0.1
    if not labels or not _NUMERIC_LABEL.match(labels[-1]):
        return None
    if len(labels) > 4 or not all(_NUMERIC_LABEL.match(label) for label in labels):
        raise Refused("invalid_host", f"{host} is neither an address nor a name")
    numbers = [_parse_ipv4_part(label, host) for label in labels]
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (5 - len(numbers)):
        raise Refused("invalid_host", f"{host} is out of range")
    value = last
    for index, n in enumerate(leading):
        value += n << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _parse_ipv4_part(label: str, host: str) -> int:
    if label[:2].lower() == "0x":
        if len(label) == 2:  # "0x" is 0 to WHATWG and invalid to inet_aton: parsers disagree, so refuse
            raise Refused("invalid_host", f"{host}: bare 0x")
        return int(label[2:], 16)
    if len(label) > 1 and label.startswith("0"):
        if not set(label) <= set("01234567"):
            raise Refused("invalid_host", f"{host}: {label} is not octal")
        return int(label, 8)
    return int(label, 10)


def _parse_ip_text(text: str) -> IPAddress:
    """An address as getaddrinfo returns it (IPv6 may carry a %scope, which we drop: the address decides)."""
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        raise Refused("invalid_address", text) from None

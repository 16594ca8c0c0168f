"""AddressPolicy: which addresses and URLs the fetcher may use. Pure: no sockets are opened here."""

from __future__ import annotations

import ipaddress
import socket

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from consumer.netpolicy import AddressPolicy, Refused, parse_ipv4_number, parse_url

DEFAULT = AddressPolicy()


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "shared"),
        ("169.254.169.254", "link_local"),  # cloud metadata
        ("169.254.0.1", "link_local"),
        ("fe80::1", "link_local"),
        ("fe80::1%2", "link_local"),  # as getaddrinfo may return it, with a scope
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("fec0::1", "private"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("255.255.255.255", "reserved"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "reserved"),
        ("198.18.0.1", "reserved"),
        ("2001:db8::1", "reserved"),
        ("100::1", "reserved"),
        ("4000::1", "reserved"),  # outside global unicast 2000::/3
        # IPv6 forms that carry an IPv4 address are judged by that address.
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:7f00:1", "loopback"),
        ("::ffff:169.254.169.254", "link_local"),
        ("::ffff:10.0.0.1", "private"),
        ("::127.0.0.1", "loopback"),  # IPv4-compatible (deprecated)
        ("::10.0.0.1", "private"),
        ("64:ff9b::127.0.0.1", "loopback"),  # NAT64
        ("64:ff9b::a9fe:a9fe", "link_local"),
        ("64:ff9b:1::1", "private"),  # local-use NAT64
        ("2002:7f00:1::1", "loopback"),  # 6to4
        ("2002:a9fe:a9fe::", "link_local"),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", "loopback"),  # Teredo, client 127.0.0.1 (obfuscated)
        ("not an address", "invalid_address"),
    ],
)
def test_refused_addresses(address: str, reason: str) -> None:
    assert DEFAULT.check_ip(address) == reason


@pytest.mark.parametrize(
    "address",
    ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e", "::ffff:8.8.8.8",
     "2002:808:808::1", "64:ff9b::808:808", "172.32.0.1", "100.128.0.1", "11.0.0.1"],
)
def test_public_addresses_pass(address: str) -> None:
    assert DEFAULT.check_ip(address) is None


def test_allow_private_allows_internal_ranges_but_never_unspecified_or_multicast() -> None:
    policy = AddressPolicy(allow_private=True)
    for address in ("127.0.0.1", "10.0.0.1", "169.254.169.254", "::1", "fd00::1", "::ffff:10.0.0.1"):
        assert policy.check_ip(address) is None, address
    for address in ("0.0.0.0", "::", "224.0.0.1", "ff02::1", "::ffff:0.0.0.0", "::ffff:224.0.0.1"):
        assert policy.check_ip(address) is not None, address


def test_allow_cidrs_allow_exactly_their_networks() -> None:
    policy = AddressPolicy(allow_cidrs=[ipaddress.ip_network("10.20.0.0/16"), ipaddress.ip_network("127.0.0.1/32")])
    assert policy.check_ip("10.20.3.4") is None
    assert policy.check_ip("127.0.0.1") is None
    assert policy.check_ip("::ffff:10.20.3.4") is None  # the carried address is allow-listed
    assert policy.check_ip("10.21.0.1") == "private"
    assert policy.check_ip("127.0.0.2") == "loopback"
    assert policy.check_ip("169.254.169.254") == "link_local"
    assert policy.check_ip("::1") == "loopback"


def test_every_resolved_address_must_pass() -> None:
    assert DEFAULT.check_addresses(["8.8.8.8", "1.1.1.1"]) is None
    assert DEFAULT.check_addresses(["8.8.8.8", "10.0.0.1"]) == "private"  # one bad answer is enough
    assert DEFAULT.check_addresses(["2606:4700::1", "::1"]) == "loopback"
    assert DEFAULT.check_addresses([]) == "no_address"


# -- URLs --------------------------------------------------------------------------------------------

LOOPBACK_SPELLINGS = [
    "http://127.0.0.1/",
    "http://127.0.0.1:8080/x",
    "http://127.1/",
    "http://127.0.1/",
    "http://2130706433/",
    "http://0x7f000001/",
    "http://0x7F.0x0.0x0.0x1/",
    "http://0177.0.0.1/",
    "http://0177.1/",
    "http://017700000001/",
    "http://0x7f.1/",
    "http://127.000.000.001/",
    "http://127.0.0.1./",
    "http://[::1]/",
    "http://[0:0:0:0:0:0:0:1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://[::127.0.0.1]/",
    "http://[64:ff9b::127.0.0.1]/",
    "http://[2002:7f00:1::]/",
    "http://0/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://①②⑦.0.0.1/",
    "http://１２７.０.０.１/",
    "HTTP://127.0.0.1/",
    "https://127.0.0.1/",
]


@pytest.mark.parametrize("url", LOOPBACK_SPELLINGS)
def test_loopback_spellings_are_refused(url: str) -> None:
    with pytest.raises(Refused) as refused:
        DEFAULT.check_url(url)
    assert refused.value.reason in {"loopback", "unspecified"}


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://a@127.0.0.1/", "userinfo"),
        ("http://user:pw@example.com/", "userinfo"),
        ("http://example.com@127.0.0.1/", "userinfo"),
        ("http://127.0.0.1\\@example.com/", "invalid_url"),
        ("http://127.0.0.1%2f@example.com/", "userinfo"),
        ("http://exa mple.com/", "invalid_url"),
        ("http://example.com\t/", "invalid_url"),
        ("http://ex\nample.com/", "invalid_url"),
        (" http://example.com/", "invalid_url"),
        ("ftp://example.com/a.jpg", "scheme"),
        ("file:///etc/passwd", "scheme"),
        ("gopher://127.0.0.1:6379/_INFO", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("data:image/png;base64,AAAA", "scheme"),
        ("//example.com/a.jpg", "scheme"),
        ("example.com/a.jpg", "scheme"),
        ("", "invalid_url"),
        ("http://", "invalid_host"),
        ("http:///a.jpg", "invalid_host"),
        ("http://example.com:0/", "invalid_port"),
        ("http://example.com:99999/", "invalid_url"),
        ("http://example.com:/", "invalid_port"),
        ("http://1.2.3.4.5/", "invalid_host"),
        ("http://08.0.0.1/", "invalid_host"),  # "08" is neither octal nor decimal to every parser
        ("http://256.0.0.1/", "invalid_host"),
        ("http://0x100000000/", "invalid_host"),
        ("http://0x/", "invalid_host"),
        ("http://images.0x/", "invalid_host"),
        ("http://%31%32%37.0.0.1/", "invalid_host"),
        ("http://127.0.0.1%00.example.com/", "invalid_host"),
        ("http://[fe80::1%25eth0]/", "invalid_host"),
        ("http://[::1/", "invalid_url"),
        ("http://exa_mple..com/", "invalid_host"),
        ("http://0x08080808/", "noncanonical_ip"),  # public, but nobody spells a real image host in hex
        ("http://169.254.169.254/latest/meta-data/", "link_local"),
        ("http://[::ffff:169.254.169.254]/", "link_local"),
        ("http://10.0.0.1/", "private"),
        ("http://0xa9.0xfe.0xa9.0xfe/", "link_local"),
        ("http://" + "a" * 3000 + ".com/", "invalid_url"),
    ],
)
def test_refused_urls(url: str, reason: str) -> None:
    with pytest.raises(Refused) as refused:
        DEFAULT.check_url(url)
    assert refused.value.reason == reason


@pytest.mark.parametrize(
    ("url", "rebuilt", "host", "port"),
    [
        ("http://Example.COM/a.jpg?x=1#frag", "http://example.com/a.jpg?x=1", "example.com", 80),
        ("https://example.com:443/a.jpg", "https://example.com/a.jpg", "example.com", 443),
        ("https://example.com:8443", "https://example.com:8443/", "example.com", 8443),
        ("http://example.com./a", "http://example.com/a", "example.com", 80),
        ("http://bücher.de/k.png", "http://xn--bcher-kva.de/k.png", "xn--bcher-kva.de", 80),
        ("http://8.8.8.8/a", "http://8.8.8.8/a", "8.8.8.8", 80),
        ("http://[2606:4700:4700:0::1111]:81/", "http://[2606:4700:4700::1111]:81/", "2606:4700:4700::1111", 81),
        ("http://img.example//evil.com/x", "http://img.example//evil.com/x", "img.example", 80),
        ("http://0x7f.example.com/a", "http://0x7f.example.com/a", "0x7f.example.com", 80),  # a name, resolved later
    ],
)
def test_accepted_urls_are_rebuilt_from_their_checked_parts(url: str, rebuilt: str, host: str, port: int) -> None:
    target = DEFAULT.check_url(url)
    assert (target.url, target.host, target.port) == (rebuilt, host, port)
    assert target.ip is None or str(target.ip) == host


def test_names_are_not_resolved_by_the_policy() -> None:
    # "localhost" is a name: the fetcher resolves it and checks the answers (see test_fetch).
    target = DEFAULT.check_url("http://localhost:8080/a.jpg")
    assert target.ip is None and target.host == "localhost"


def test_allow_listed_literal_passes_but_odd_spellings_of_it_do_not() -> None:
    policy = AddressPolicy(allow_cidrs=[ipaddress.ip_network("127.0.0.1/32")])
    assert str(policy.check_url("http://127.0.0.1:8080/a").ip) == "127.0.0.1"
    for url in ("http://127.1:8080/a", "http://2130706433:8080/a", "http://0x7f000001:8080/"):
        with pytest.raises(Refused):
            policy.check_url(url)


# -- the numeric-host parser agrees with the C library -----------------------------------------------------

_part = st.one_of(
    st.integers(0, 2**32 - 1).map(str),
    st.integers(0, 2**32 - 1).map(lambda n: hex(n)),
    st.integers(0, 2**32 - 1).map(lambda n: "0" + oct(n)[2:]),
    st.integers(0, 300).map(str),
    st.sampled_from(["0", "00", "0x", "08", "09", "0x0", "255", "256"]),
)


@given(st.lists(_part, min_size=1, max_size=5))
@example(["0x"])
@example(["0x7f", "0", "0", "0x"])
def test_numeric_hosts_parse_like_inet_aton(parts: list[str]) -> None:
    """Whatever glibc's inet_aton (what getaddrinfo uses for numeric hosts) reads, we read the same, or refuse."""
    host = ".".join(parts)
    try:
        expected: str | None = socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        expected = None
    try:
        ours = parse_ipv4_number(host)
    except Refused:
        ours = None
        # Refusing is always safe; accepting something the C library reads differently would not be.
    if ours is not None:
        assert str(ours) == expected, host


@given(st.text(max_size=60))
def test_parse_url_never_fails_unexpectedly(text: str) -> None:
    for candidate in (text, "http://" + text, "http://" + text + "/x", "https://[" + text + "]/"):
        try:
            target = parse_url(candidate)
        except Refused:
            continue
        assert target.scheme in {"http", "https"}
        assert target.url.startswith(target.scheme + "://")
        assert parse_url(target.url) == target  # rebuilding is stable

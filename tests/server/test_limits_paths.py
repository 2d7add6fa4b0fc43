"""The auth limiter and the path allowlist: pure policy, driven directly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.limits import AuthLimiter, ConnectionsPerAddress, address_key
from server.paths import UnsafePath, normalize_path, path_allowed, valid_prefix


def test_an_address_is_blocked_after_five_failures_within_a_minute() -> None:
    limiter = AuthLimiter()
    for second in range(5):
        assert not limiter.blocked("203.0.113.5", float(second))
        limiter.failed("203.0.113.5", float(second))
    assert limiter.blocked("203.0.113.5", 10.0)
    assert not limiter.blocked("198.51.100.1", 10.0)  # others are not affected
    assert not limiter.blocked("203.0.113.5", 61.0)  # the failures age out


def test_a_success_clears_the_record() -> None:
    limiter = AuthLimiter()
    for second in range(4):
        limiter.failed("203.0.113.5", float(second))
    limiter.succeeded("203.0.113.5")
    limiter.failed("203.0.113.5", 5.0)
    assert not limiter.blocked("203.0.113.5", 5.0)


def test_the_table_of_addresses_is_bounded() -> None:
    limiter = AuthLimiter(max_addresses=100)
    for n in range(10_000):
        limiter.failed(f"10.0.{n // 256}.{n % 256}", 1.0)
    assert len(limiter) == 100


def test_an_address_holds_at_most_its_limit_of_connections() -> None:
    limit = ConnectionsPerAddress(2)
    first, second = limit.admit("203.0.113.5"), limit.admit("203.0.113.5")
    assert first == second == "203.0.113.5"
    assert limit.admit("203.0.113.5") is None
    assert limit.refused == 1
    assert limit.admit("198.51.100.1") == "198.51.100.1"  # others are not affected
    limit.release("203.0.113.5")
    assert limit.admit("203.0.113.5") == "203.0.113.5"  # a closed one makes room


def test_the_table_holds_only_addresses_with_a_connection_open() -> None:
    limit = ConnectionsPerAddress(4)
    keys = [limit.admit(f"10.0.{n // 256}.{n % 256}") for n in range(1000)]
    assert len(limit) == 1000
    for key in keys:
        assert key is not None
        limit.release(key)
    assert len(limit) == 0


def test_no_limit_refuses_nothing_and_still_counts() -> None:
    limit = ConnectionsPerAddress(0)
    assert all(limit.admit("203.0.113.5") == "203.0.113.5" for _ in range(10_000))
    assert limit.refused == 0
    assert len(limit) == 1  # the addresses holding connections, for /status
    for _ in range(10_000):
        limit.release("203.0.113.5")
    assert len(limit) == 0


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("203.0.113.5", "203.0.113.5"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # the same host's /64
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("::ffff:203.0.113.5", "203.0.113.5"),  # IPv4 on a dual-stack socket
        ("fe80::1%eth0", "fe80::/64"),
        ("-", "-"),  # no peer address: counted as itself
    ],
)
def test_visitors_are_counted_by_ipv4_address_or_ipv6_64(address: str, key: str) -> None:
    assert address_key(address) == key


def test_one_ipv6_host_cannot_take_more_by_changing_its_address() -> None:
    limit = ConnectionsPerAddress(3)
    admitted = [limit.admit(f"2001:db8::{n:x}") for n in range(1, 10)]
    assert admitted.count(None) == 6


def test_the_command_line_default_is_the_config_default() -> None:
    from homeport.cli import main
    from server.config import ServerConfig

    server = main.commands["server"]  # type: ignore[attr-defined]
    (option,) = (p for p in server.params if p.name == "max_connections_per_address")
    assert option.default == ServerConfig.max_connections_per_address == 256


@pytest.mark.parametrize(
    ("target", "normalized"),
    [
        (b"/", "/"),
        (b"/function/figlet?x=../../system", "/function/figlet"),
        (b"/function//figlet", "/function/figlet"),
        (b"/function/./figlet/", "/function/figlet/"),
        (b"/function/../system/functions", "/system/functions"),
        (b"/function/..%2Fsystem/functions", "/system/functions"),
        (b"/function/%2e%2e/system", "/system"),
        (b"/function\\..\\system", "/system"),
        (b"//system//functions", "/system/functions"),
        (b"/a%20b", "/a b"),
    ],
)
def test_paths_are_normalised_before_matching(target: bytes, normalized: str) -> None:
    assert normalize_path(target) == normalized


@pytest.mark.parametrize(
    "target", [b"/..", b"/a/../../b", b"/a%2", b"/a%zz", b"/a%252e%252e/b", b"/%255c"]
)
def test_unsafe_paths_are_refused(target: bytes) -> None:
    with pytest.raises(UnsafePath):
        normalize_path(target)


FAASD = ("/function/", "/async-function/")


@pytest.mark.parametrize(
    ("target", "allowed"),
    [
        (b"/function/figlet", True),
        (b"/function/figlet?q=1", True),
        (b"/async-function/figlet", True),
        (b"/function", True),
        (b"/functions", False),
        (b"/system/functions", False),
        (b"/function/../system/functions", False),
        (b"/function/..%2Fsystem/functions", False),
        (b"/function/%2e%2e/system/functions", False),
        (b"/function/%2E%2E%2Fsystem", False),
        (b"//system/functions", False),
        (b"/%2Fsystem/functions", False),
        (b"/function/..\\system", False),
        (b"/function/%252e%252e/system", False),
        (b"/ui/", False),
        (b"/FUNCTION/figlet", False),
        (b"*", False),
    ],
)
def test_the_faasd_allowlist_lets_only_functions_through(target: bytes, allowed: bool) -> None:
    assert path_allowed(target, FAASD) is allowed


def test_an_empty_allowlist_allows_everything() -> None:
    assert path_allowed(b"/system/functions", ())


@pytest.mark.parametrize(
    ("prefix", "valid"),
    [
        ("/function/", True),
        ("/", True),
        ("function/", False),
        ("/a/../b", False),
        ("/a%2F", False),
        ("/ü", False),
    ],
)
def test_declared_prefixes_must_be_plain_paths(prefix: str, valid: bool) -> None:
    assert valid_prefix(prefix) is valid


SEGMENTS = st.sampled_from(
    ["function", "system", "..", ".", "", "%2e%2e", "%2F", "%2f..", "\\", "figlet", "%"]
)


@settings(deadline=None, max_examples=500)
@given(st.lists(SEGMENTS, max_size=8))
def test_an_allowed_path_never_resolves_outside_its_prefix(segments: list[str]) -> None:
    target = ("/" + "/".join(segments)).encode()
    try:
        normalized = normalize_path(target)
    except UnsafePath:
        assert not path_allowed(target, ("/function/",))
        return
    assert normalized.startswith("/")
    assert "//" not in normalized
    assert not {".", ".."} & set(normalized.split("/"))
    if path_allowed(target, ("/function/",)):
        assert normalized == "/function" or normalized.startswith("/function/")

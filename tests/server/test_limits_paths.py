"""The auth limiter and the path allowlist: pure policy, driven directly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.limits import AuthLimiter
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

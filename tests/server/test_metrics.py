"""What ``GET /metrics`` counts and writes (server/counts.py, server/metrics.py), read back
with prometheus_client's parser."""

from __future__ import annotations

import os
import resource
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from server.counts import DURATION_BUCKETS_S, MAX_CLIENTS, OTHER_CLIENTS, RequestCounts
from server.metrics import Exposition, render

STATUS: dict[str, Any] = {
    "clients": [
        {"name": "pi", "connection": 0, "streams": 5, "idle_streams": 2, "round_trip_ms": 1.5},
        {"name": "pi", "connection": 1, "streams": 1, "idle_streams": 0, "round_trip_ms": None},
        {"name": "nas", "connection": 0, "streams": 0, "idle_streams": 0, "round_trip_ms": 20.0},
    ],
    "visitor_connections": 7,
    "tcp_connections": 2,
    "visitor_addresses": 3,
    "connections_refused": {"max_connections": 4, "per_address": 9},
    "control_handshakes": 1,
    "control_connections_refused": {"max_handshakes": 0, "per_address": 6},
    "visitor_write_buffer_bytes": 65536,
    "requests_in_flight": 5,
    "auth_failures": 11,
    "auth_rate_limited": 8,
}


def scrape(counts: RequestCounts | None = None, status: dict[str, Any] = STATUS) -> list[Sample]:
    """Render, check every family is declared once with HELP and TYPE, and return the samples."""
    text = render(status, counts or RequestCounts(), "homeport/1.2.3")
    families = list(text_string_to_metric_families(text))
    names = [family.name for family in families]
    assert len(names) == len(set(names)), names
    for family in families:
        assert family.documentation, family.name
        assert family.type in {"gauge", "counter", "histogram"}, family.name
    return [sample for family in families for sample in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, (name, labels, [s for s in samples if s.name == name])
    return found[0]


def test_the_status_snapshot_becomes_gauges_and_counters() -> None:
    samples = scrape()
    assert value(samples, "homeport_build_info", version="1.2.3") == 1
    assert value(samples, "homeport_client_connections", client="pi") == 2
    assert value(samples, "homeport_client_connections", client="nas") == 1
    assert value(samples, "homeport_client_streams", client="pi") == 4  # idle pooled ones not
    assert value(samples, "homeport_client_round_trip_seconds", client="pi", connection="0") == (
        pytest.approx(0.0015)
    )
    assert not [s for s in samples if s.labels.get("connection") == "1"]  # never measured
    assert value(samples, "homeport_visitor_connections", kind="http") == 5
    assert value(samples, "homeport_visitor_connections", kind="tcp") == 2
    assert value(samples, "homeport_visitor_addresses") == 3
    assert value(samples, "homeport_requests_in_flight") == 5
    assert value(samples, "homeport_visitor_write_buffer_bytes") == 65536
    refused = "homeport_visitor_connections_refused_total"
    assert value(samples, refused, limit="max_connections") == 4
    assert value(samples, refused, limit="per_address") == 9
    assert value(samples, "homeport_control_handshakes") == 1
    assert value(samples, "homeport_control_connections_refused_total", limit="per_address") == 6
    assert value(samples, "homeport_auth_failures_total") == 11
    assert value(samples, "homeport_auth_rate_limited_total") == 8


def test_the_acme_certificates_expiry_and_failed_orders_are_reported() -> None:
    https = {
        "certificate": "acme",
        "domains": ["fn.example.com"],
        "not_after": "2027-02-27T10:00:00+00:00",
        "renew_at": "2027-01-28T10:00:00+00:00",
        "acme_failures": 2,
    }
    samples = scrape(status={**STATUS, "https": https})
    expiry = "homeport_https_certificate_expiry_timestamp_seconds"
    assert value(samples, expiry) == 1803722400
    assert value(samples, "homeport_acme_order_failures_total") == 2
    # Before the first certificate: the family, and no sample to alert on wrongly.
    samples = scrape(status={**STATUS, "https": {**https, "not_after": None}})
    assert not [s for s in samples if s.name == expiry]
    # Certificates from files, or no HTTPS: neither family.
    for status in ({**STATUS, "https": {"certificate": "files", "cert": "c.pem"}}, STATUS):
        assert not [s for s in scrape(status=status) if s.name.startswith("homeport_acme")]


def test_requests_are_counted_by_client_and_status_with_their_bytes() -> None:
    counts = RequestCounts()
    for _ in range(3):
        counts.http("pi", 200, 100, 1000, 0.002)
    counts.http("pi", 404, 50, 20, 0.001)
    counts.http("-", 502, 70, 0, 0.0)
    counts.tcp("pi", 2222, 200, 5000, 7000)
    counts.tcp("pi", 2222, 502, 0, 0)
    counts.tcp("-", 5432, 503, 0, 0)
    samples = scrape(counts)
    assert value(samples, "homeport_http_requests_total", client="pi", code="200") == 3
    assert value(samples, "homeport_http_requests_total", client="pi", code="404") == 1
    assert value(samples, "homeport_http_requests_total", client="-", code="502") == 1
    tcp = "homeport_tcp_connections_total"
    assert value(samples, tcp, client="pi", port="2222", code="200") == 1
    assert value(samples, tcp, client="pi", port="2222", code="502") == 1
    assert value(samples, tcp, client="-", port="5432", code="503") == 1
    assert value(samples, "homeport_visitor_bytes_total", client="pi", way="in") == 5350
    assert value(samples, "homeport_visitor_bytes_total", client="pi", way="out") == 10020
    assert value(samples, "homeport_visitor_bytes_total", client="-", way="in") == 70


@given(st.lists(st.floats(min_value=-1.0, max_value=1000.0), max_size=50))
def test_the_duration_histogram_counts_each_request_in_every_bucket_it_fits(
    durations: list[float],
) -> None:
    counts = RequestCounts()
    for seconds in [*DURATION_BUCKETS_S, *durations]:  # each bound itself, too: le is <=
        counts.http("pi", 200, 0, 0, seconds)
    everything = [max(0.0, s) for s in [*DURATION_BUCKETS_S, *durations]]
    samples = scrape(counts)
    name = "homeport_http_request_duration_seconds"
    for bound in DURATION_BUCKETS_S:
        expected = sum(1 for s in everything if s <= bound)
        assert value(samples, f"{name}_bucket", client="pi", le=str(bound)) == expected
    assert value(samples, f"{name}_bucket", client="pi", le="+Inf") == len(everything)
    assert value(samples, f"{name}_count", client="pi") == len(everything)
    assert value(samples, f"{name}_sum", client="pi") == pytest.approx(sum(everything))


def test_a_client_with_only_tcp_connections_has_no_empty_histogram() -> None:
    counts = RequestCounts()
    counts.tcp("db", 5432, 200, 1, 1)
    samples = scrape(counts)
    assert not [s for s in samples if s.name.startswith("homeport_http")]


def test_client_names_beyond_the_limit_are_counted_together() -> None:
    counts = RequestCounts()
    for n in range(MAX_CLIENTS + 50):
        counts.http(f"client-{n}", 200, 1, 1, 0.0)
    assert len(counts.clients) == MAX_CLIENTS + 1
    samples = scrape(counts)
    assert value(samples, "homeport_http_requests_total", client=OTHER_CLIENTS, code="200") == 50
    assert value(samples, "homeport_http_requests_total", client="client-0", code="200") == 1


@given(st.text(max_size=40))
def test_any_label_value_and_help_text_read_back_as_written(text: str) -> None:
    out = Exposition()
    out.family("homeport_test", "gauge", f"help {text}.")
    out.sample("homeport_test", 1.5, {"client": text})
    (family,) = text_string_to_metric_families(out.text())
    assert family.documentation == f"help {text}."
    (sample,) = family.samples
    assert sample.labels == {"client": text}
    assert sample.value == 1.5


@pytest.mark.parametrize(
    ("number", "written"),
    [(3, "3"), (0.25, "0.25"), (1e-05, "1e-05"), (float("inf"), "+Inf"), (float("nan"), "NaN")],
)
def test_numbers_are_written_as_the_format_spells_them(number: float, written: str) -> None:
    out = Exposition()
    out.family("homeport_test", "gauge", "a number")
    out.sample("homeport_test", number)
    assert out.text().endswith(f"\nhomeport_test {written}\n")


def test_the_process_metrics_are_this_process() -> None:
    samples = scrape()
    with open("/proc/self/statm") as statm:
        resident = int(statm.read().split()[1]) * resource.getpagesize()
    assert value(samples, "process_resident_memory_bytes") == pytest.approx(resident, rel=0.2)
    assert value(samples, "process_open_fds") == pytest.approx(
        len(os.listdir("/proc/self/fd")), abs=2
    )
    assert value(samples, "process_max_fds") == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert value(samples, "process_cpu_seconds_total") > 0
    start = value(samples, "process_start_time_seconds")
    assert 0 < start <= os.stat("/proc/self").st_ctime + 2

"""bench.https reads each way against direct nginx of its own scheme, and nginx gets a TLS port."""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import https
from bench.errors import BenchError
from bench.https import (
    CLIENT,
    DIRECT,
    DOWNLOAD,
    EXIT_SERVER,
    FULL_HANDSHAKE,
    HOMEPORT,
    HTTP,
    HTTPS,
    KEEP_ALIVE,
    NEW_CONNECTION,
    NGINX,
    WAYS,
    Round,
    Sample,
    Way,
    Workload,
)
from bench.machine import MachineCpu
from bench.processes import LOOPBACK
from bench.upstream import SMALL_BYTES, TlsListener, render_config, write_config
from bench.wrk import LOAD_DURATION_S
from tunnel.tls import ensure_self_signed

QUIET = MachineCpu(busy_percent=80.0, steal_percent=0.0, others_percent=1.0)
BUSY = MachineCpu(busy_percent=95.0, steal_percent=0.0, others_percent=30.0)


def _sample(rate: float, cost: dict[str, float], machine: MachineCpu | None = QUIET) -> Sample:
    """A measurement at ``rate`` with ``cost`` CPU per unit, its load generator at 50 %."""
    return Sample(rate, cost, 50, machine)


def _round(
    http: tuple[float, float], https_: tuple[float, float], server: tuple[float, float] = (20, 30)
) -> Round:
    """Direct's and homeport's rates over HTTP and over HTTPS; the exit server's µs/req."""
    return {
        "direct http": _sample(http[0], {NGINX: 10}),
        "homeport http": _sample(http[1], {EXIT_SERVER: server[0], CLIENT: 14}),
        "direct https": _sample(https_[0], {NGINX: 13}),
        "homeport https": _sample(https_[1], {EXIT_SERVER: server[1], CLIENT: 15}),
    }


def test_each_way_is_read_against_direct_nginx_of_its_own_scheme() -> None:
    one = _round(http=(60_000, 24_000), https_=(40_000, 20_000))
    assert https.ratio(one, Way(HOMEPORT, HTTP)) == pytest.approx(0.4)
    assert https.ratio(one, Way(HOMEPORT, HTTPS)) == pytest.approx(0.5)
    assert https.ratio(one, Way(DIRECT, HTTPS)) == 1.0
    assert Way(HOMEPORT, HTTPS).direct == Way(DIRECT, HTTPS)


def test_each_way_goes_first_in_turn() -> None:
    firsts = [https.turn(WAYS, number)[0] for number in range(len(WAYS))]
    assert firsts == list(WAYS)
    assert sorted(https.turn(WAYS, 1), key=WAYS.index) == list(WAYS)


def test_a_full_handshake_is_measured_over_https_only() -> None:
    assert [way.key for way in Workload(FULL_HANDSHAKE).ways()] == [
        "direct https",
        "homeport https",
    ]
    assert len(Workload(KEEP_ALIVE, 100).ways()) == 4
    assert Workload(KEEP_ALIVE, 100).label == "GET /1k c=100, keep-alive"
    assert (Workload(DOWNLOAD).rate_unit, Workload(DOWNLOAD).cost_unit) == ("MiB/s", "CPU-s/GiB")
    assert Workload(NEW_CONNECTION, 10).cost_unit == "µs/conn"


def test_a_span_is_one_figure_when_the_rounds_agree() -> None:
    assert https.span([0.39, 0.37, 0.38], 2) == "0.37-0.39"
    assert https.span([0.371, 0.374], 2) == "0.37"
    assert https.span([12_345.0, 9_876.0]) == "9,876-12,345"
    assert https.span([25.0, 28.0], signed=True) == "+25 to +28"
    assert https.span([-3.0, 2.0], signed=True) == "-3 to +2"
    assert https.span([]) == "-"


def test_a_round_prints_each_scheme_with_its_ratio_and_cpu() -> None:
    one = _round(http=(60_000, 24_000), https_=(40_000, 20_000))
    lines = https.format_round(Workload(KEEP_ALIVE, 100), 1, one)
    assert lines[0] == "GET /1k c=100, keep-alive, req/s, round 2"
    assert lines[1] == (
        "  HTTP   direct 60,000 (nginx 10 µs/req; load 50 %)   homeport 24,000 = 0.40 "
        "(exit server 20, client 14 µs/req; load 50 %)"
    )
    assert "homeport 20,000 = 0.50 (exit server 30," in lines[2]


def test_a_round_with_other_load_says_so() -> None:
    one = dict(_round(http=(60_000, 24_000), https_=(40_000, 20_000)))
    one["direct https"] = _sample(40_000, {NGINX: 13}, BUSY)
    lines = https.format_round(Workload(KEEP_ALIVE, 1), 0, one)
    assert "!! others 30 %" in lines[2]
    assert "!!" not in lines[1]


def test_the_summary_gives_ranges_and_what_https_adds() -> None:
    rounds = [
        _round(http=(60_000, 24_000), https_=(40_000, 20_000), server=(20, 30)),
        _round(http=(50_000, 21_000), https_=(40_000, 18_000), server=(21, 33)),
    ]
    lines = https.summary({Workload(KEEP_ALIVE, 100): rounds})
    assert lines[1] == "GET /1k c=100, keep-alive (req/s; CPU in µs/req)"
    assert _cells(lines[2]) == "HTTP | 50,000-60,000 | 10 | 21,000-24,000 | 0.40-0.42 | 20-21 | 14"
    assert _cells(lines[3]) == "HTTPS | 40,000 | 13 | 18,000-20,000 | 0.45-0.50 | 30-33 | 15"
    # HTTPS over HTTP in each round: direct 0.67 and 0.80, homeport 0.83 and 0.86; the
    # exit server spent 10 and 12 µs more per request over HTTPS, nginx 3, the client 1.
    assert _cells(lines[4]) == "HTTPS/HTTP | 0.67-0.80 | +3 | 0.83-0.86 | +10 to +12 | +1"
    assert lines[4].index("+10") == lines[0].index("exit server CPU")


def _cells(line: str) -> str:
    """A summary row's cells joined by `` | `` (they are two or more spaces apart)."""
    return " | ".join(cell.strip() for cell in line.split("  ") if cell.strip())


def test_the_summary_of_a_test_over_https_only_has_no_https_over_http_row() -> None:
    one = {
        "direct https": _sample(800, {NGINX: 480}),
        "homeport https": _sample(600, {EXIT_SERVER: 680, CLIENT: 90}),
    }
    lines = https.summary({Workload(FULL_HANDSHAKE): [one]})
    assert [_cells(line) for line in lines[2:]] == ["HTTPS | 800 | 480 | 600 | 0.75 | 680 | 90"]


def test_other_load_during_a_measurement_is_reported() -> None:
    quiet = {Workload(KEEP_ALIVE, 1): [_round(http=(1, 1), https_=(1, 1))]}
    assert len(https.load_note(quiet)) == 1
    assert "1.0 % at most" in https.load_note(quiet)[0]
    busy_round = dict(_round(http=(1, 1), https_=(1, 1)))
    busy_round["homeport https"] = _sample(1, {}, BUSY)
    note = https.load_note({Workload(KEEP_ALIVE, 1): [busy_round]})
    assert "30.0 % at most" in note[0]
    assert note[1].startswith("!! OTHER LOAD ON THE MACHINE")


def test_unknown_machine_counters_are_said_to_be_unknown() -> None:
    one = {key: _sample(1, {}, None) for key in ("direct https", "homeport https")}
    assert "unknown" in https.load_note({Workload(FULL_HANDSHAKE): [one]})[0]


def test_the_default_run_takes_a_few_minutes() -> None:
    workloads = https.planned_workloads([1, 100])
    assert [workload.kind for workload in workloads] == [
        KEEP_ALIVE,
        KEEP_ALIVE,
        NEW_CONNECTION,
        FULL_HANDSHAKE,
        DOWNLOAD,
    ]
    assert https.estimated_s(workloads, https.DEFAULT_ROUNDS, LOAD_DURATION_S) < 4 * 60


S_TIME_OUTPUT = """\
Collecting connection statistics for 3 seconds
*****************************************

2291 connections in 1.36s; 1684.56 connections/user sec, bytes read 2884369
2291 connections in 4 real seconds, 1259 bytes read per connection
"""


def test_s_time_report_is_read() -> None:
    result = https.parse_s_time(S_TIME_OUTPUT)
    assert (result.connections, result.bytes_per_connection) == (2291, 1259)


def test_s_time_report_without_totals_raises() -> None:
    with pytest.raises(BenchError, match="cannot read openssl s_time"):
        https.parse_s_time("Collecting connection statistics for 3 seconds\nconnect: refused\n")


def test_s_time_makes_a_new_session_on_every_connection() -> None:
    args = https.s_time_args(Path("/usr/bin/openssl"), 8443, 5)
    assert args[:4] == ["/usr/bin/openssl", "s_time", "-connect", f"{LOOPBACK}:8443"]
    assert "-new" in args
    assert "-reuse" not in args
    assert args[args.index("-www") + 1] == "/1k"
    assert args[args.index("-time") + 1] == "5"


def test_nginx_config_without_a_certificate_has_no_tls(tmp_path: Path) -> None:
    config = render_config(tmp_path, 8080, "")
    assert f"listen {LOOPBACK}:8080;" in config
    assert "ssl" not in config


def test_nginx_config_with_a_certificate_listens_with_tls_13(tmp_path: Path) -> None:
    tls = TlsListener(8443, tmp_path / "tls.crt", tmp_path / "tls.key")
    config = render_config(tmp_path, 8080, "", tls)
    assert f"listen {LOOPBACK}:8080;" in config
    assert f"listen {LOOPBACK}:8443 ssl;" in config
    assert f"ssl_certificate {tmp_path / 'tls.crt'};" in config
    assert f"ssl_certificate_key {tmp_path / 'tls.key'};" in config
    assert "ssl_protocols TLSv1.3;" in config


@pytest.mark.skipif(shutil.which("nginx", path="/usr/sbin:/usr/bin") is None, reason="no nginx")
def test_nginx_accepts_the_config_with_a_certificate(tmp_path: Path) -> None:
    nginx = shutil.which("nginx", path="/usr/sbin:/usr/bin")
    assert nginx is not None
    build = subprocess.run([nginx, "-V"], capture_output=True, text=True, check=True).stderr
    certificate = ensure_self_signed(tmp_path / "certificate", [LOOPBACK])
    tls = TlsListener(8443, certificate.cert_path, certificate.key_path)
    config = write_config(tmp_path, 8080, build, tls)
    error_log = tmp_path / "nginx-error.log"
    checked = subprocess.run(
        [nginx, "-t", "-p", f"{tmp_path}/", "-e", str(error_log), "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr


@contextlib.contextmanager
def _tls_server(tmp_path: Path, answer: bytes) -> Iterator[tuple[int, Path]]:
    """A TLS server answering two connections with ``answer``: its port and certificate."""
    certificate = ensure_self_signed(tmp_path / "certificate", [LOOPBACK])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate.cert_path, certificate.key_path)
    listener = socket.create_server((LOOPBACK, 0))
    listener.settimeout(5)

    def serve() -> None:
        for _ in range(2):
            raw, _ = listener.accept()
            with context.wrap_socket(raw, server_side=True) as conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(4096)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], certificate.cert_path
    finally:
        thread.join(10)
        listener.close()


def test_the_tls_probe_resumes_a_session_and_measures_the_answer(tmp_path: Path) -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1024\r\n\r\n" + bytes(SMALL_BYTES)
    with _tls_server(tmp_path, answer) as (port, cert):
        probe = https._probe_tls(port, ssl.create_default_context(cafile=cert))
    assert probe.version == "TLSv1.3"
    assert probe.resumed
    assert probe.answer_bytes == len(answer)


def test_the_tls_probe_refuses_an_answer_that_is_not_the_small_file(tmp_path: Path) -> None:
    answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    with (
        _tls_server(tmp_path, answer) as (port, cert),
        pytest.raises(BenchError, match="404 Not Found"),
    ):
        https._probe_tls(port, ssl.create_default_context(cafile=cert))

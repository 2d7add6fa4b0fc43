"""The peers (pipenet, PageKite) in the benchmark: loopback only, routed by Host, side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

import pytest

from bench import measure, peers, run
from bench.errors import BenchError
from bench.measure import HttpPoint, Measured, Transfers
from bench.peers import (
    PIPENET_VERSION,
    ensure_pipenet,
    installed_version,
    pagekite_backend_args,
    pagekite_frontend_args,
    pipenet_client_args,
    pipenet_server_args,
)
from bench.processes import LOOPBACK, Child
from bench.report import Report, side_by_side
from bench.targets import DIRECT, HOMEPORT, PAGEKITE, PIPENET, RELAYS, SSH_R, Target
from bench.tools import PeerToolPaths, ToolPaths
from bench.transfer import TransferResult
from bench.wrk import WrkResult
from tests.bench.fakes import StillChild, wrk_result

NODE = Path("/usr/bin/node")  # only written into command lines
SCRIPT = Path("/opt/pipenet/cli.js")


def _option(args: list[str], name: str) -> str:
    """The value after ``name`` in ``args``."""
    return args[args.index(name) + 1]


def test_the_pipenet_server_listens_on_loopback_only_with_its_clients_on_one_port() -> None:
    args = pipenet_server_args(NODE, SCRIPT, 8000, 8001)
    assert args[:3] == [str(NODE), str(SCRIPT), "server"]
    assert _option(args, "--port") == "8000"
    assert _option(args, "--address") == LOOPBACK
    # Without --tunnel-port each client's connections would come to a random
    # port on every interface.
    assert _option(args, "--tunnel-port") == "8001"


def test_the_pipenet_client_asks_our_server_for_our_subdomain_and_forwards_to_loopback() -> None:
    args = pipenet_client_args(NODE, SCRIPT, 8000, 9000)
    assert _option(args, "--host") == f"http://{LOOPBACK}:8000"  # never pipenet.dev, its default
    assert _option(args, "--subdomain") == peers.PIPENET_SUBDOMAIN
    assert _option(args, "--local-host") == LOOPBACK
    assert _option(args, "--port") == "9000"


def test_pagekite_reads_no_configuration_binds_loopback_and_tunnels_apart(tmp_path: Path) -> None:
    frontend = pagekite_frontend_args(Path("pagekite"), 8000, 8001, "s3cret", tmp_path / "f.log")
    backend = pagekite_backend_args(Path("pagekite"), 8001, 9000, "s3cret", tmp_path / "b.log")
    for args in (frontend, backend):
        assert "--clean" in args  # no ~/.pagekite.rc, no pagekite.net defaults
    assert f"--host={LOOPBACK}" in frontend
    # Visitors on one port, the back-end's connection on the other: a
    # connection to the visitors' port is always a visitor's.
    assert "--ports=8000,8001" in frontend
    assert f"--domain=http:{peers.PAGEKITE_KITE}:s3cret" in frontend
    assert f"--frontend={LOOPBACK}:8001" in backend
    assert f"--service_on=http:{peers.PAGEKITE_KITE}:{LOOPBACK}:9000:s3cret" in backend


def _install(root: Path, version: str) -> None:
    package = root / "node_modules" / "pipenet"
    (package / "dist").mkdir(parents=True)
    (package / "dist" / "cli.js").write_text("")
    (package / "package.json").write_text(json.dumps({"name": "pipenet", "version": version}))


def _tools(tmp_path: Path, node_says: str, npm: Path = Path("/bin/false")) -> PeerToolPaths:
    """A ``node`` that prints ``node_says`` for its version; npm fails unless given."""
    node = tmp_path / "node"
    node.write_text(f"#!/bin/sh\necho {node_says}\n")
    node.chmod(0o755)
    return PeerToolPaths(node=node, npm=npm, pagekite=Path("pagekite"))


def test_an_installed_pipenet_of_the_right_version_is_used_without_npm(tmp_path: Path) -> None:
    install = tmp_path / "peers"
    _install(install, PIPENET_VERSION)
    # npm would fail: it is not run at all.
    script = ensure_pipenet(_tools(tmp_path, "v20.19.0"), install)
    assert script == peers.pipenet_script(install)


def test_a_failing_npm_stops_the_peer_with_a_way_out(tmp_path: Path) -> None:
    install = tmp_path / "peers"
    _install(install, "0.0.1")  # another version: npm must install ours
    with pytest.raises(BenchError, match="--no-peers"):
        ensure_pipenet(_tools(tmp_path, "v22.11.0"), install)


@pytest.mark.parametrize("says", ["v18.20.4", "v20.18.3", "node? never heard of it"])
def test_a_node_too_old_for_pipenet_is_named_before_npm_runs(tmp_path: Path, says: str) -> None:
    install = tmp_path / "peers"
    _install(install, PIPENET_VERSION)
    with pytest.raises(BenchError, match=r"needs Node\.js 20\.19 or later"):
        ensure_pipenet(_tools(tmp_path, says), install)


def test_a_peer_that_cannot_be_installed_leaves_the_run_and_the_run_goes_on(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def no_apt() -> PeerToolPaths:
        raise BenchError("nodejs not installed; run as root")

    monkeypatch.setattr(run, "ensure_peer_tools", no_apt)
    dropouts = measure.Dropouts()
    assert run._prepare_peers(dropouts) is None
    assert set(dropouts.reasons) == {PIPENET, PAGEKITE}
    assert "run as root" in dropouts.reasons[PAGEKITE]

    tools = _tools(tmp_path, "v18.20.4")
    monkeypatch.setattr(run, "ensure_peer_tools", lambda: tools)
    monkeypatch.setattr(run, "PEERS_DIR", tmp_path / "peers")
    dropouts = measure.Dropouts()
    prepared = run._prepare_peers(dropouts)
    assert prepared is not None
    assert prepared.pipenet is None  # PageKite still runs
    assert list(dropouts.reasons) == [PIPENET]


@pytest.mark.parametrize("manifest", ["", "{", '{"version": 3}', '{"name": "pipenet"}'])
def test_a_broken_manifest_reads_as_not_installed(tmp_path: Path, manifest: str) -> None:
    package = tmp_path / "node_modules" / "pipenet"
    package.mkdir(parents=True)
    (package / "package.json").write_text(manifest)
    assert installed_version(tmp_path) is None


def _target(key: str, port: int, host: str | None = None) -> Target:
    still = cast(Child, StillChild())
    sides = {"server": still, "client": still} if key != DIRECT else {}
    return Target(key, port, still, sides, host=host)


def test_wrk_sends_the_host_a_peer_routes_by_and_no_other(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sent: dict[int, tuple[str, ...]] = {}

    def fake_run_wrk(wrk: Path, url: str, *args: Any) -> WrkResult:
        port = int(url.split(":")[2].split("/")[0])
        sent[port] = tuple(args[-1])
        return wrk_result(1_000.0)

    monkeypatch.setattr(measure, "run_wrk", fake_run_wrk)
    tools = cast(ToolPaths, type("Tools", (), {"wrk": Path("wrk")})())
    load = measure._Load(10, 1, (measure.CLOSE_HEADER,))
    measure._wrk(tools, _target(HOMEPORT, 1), load, 1)
    measure._wrk(tools, _target(PIPENET, 2, "bench.localhost"), load, 1)
    assert sent[1] == (measure.CLOSE_HEADER,)
    assert sent[2] == (measure.CLOSE_HEADER, "Host: bench.localhost")


def test_a_download_through_a_peer_sends_its_host(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, ...]] = []

    def fake_download(curl: Path, port: int, path: str, size: int, cwd: Path, headers: Any = ()):
        sent.append(tuple(headers))
        return TransferResult(size, 1.0, 0.1)

    monkeypatch.setattr(measure, "download", fake_download)
    tools = cast(ToolPaths, type("Tools", (), {"curl": Path("curl")})())
    upstream = cast(Any, None)
    measure._transfer(tools, _target(PAGEKITE, 3, "kite.localhost"), upstream, measure.DOWNLOAD)
    measure._transfer(tools, _target(SSH_R, 4), upstream, measure.DOWNLOAD)
    assert sent == [("Host: kite.localhost",), ()]


def test_every_tunnel_stands_side_by_side_as_ratios_to_direct() -> None:
    rates = {
        DIRECT: 10_000.0,
        RELAYS: 4_400.0,  # measured second, shown last: the floor
        HOMEPORT: 4_000.0,
        SSH_R: 800.0,
        PIPENET: 450.0,
        PAGEKITE: 6.0,
    }
    measured = {
        key: Measured(wrk_result(rate, 0.001 * 10_000 / rate), {}, None, {}, True, {})
        for key, rate in rates.items()
    }
    point = HttpPoint("keep-alive", 100, 1, measured, {k: (m,) for k, m in measured.items()})
    transfers = Transfers("download", {})
    report = Report(
        started_at=0.0,
        plan=cast(Any, type("Plan", (), {"stream_counts": ()})()),
        machine={},
        software={},
        targets=tuple(rates),
        http=[point],
        new_connection=None,
        access_log=None,
        downloads=transfers,
        uploads=Transfers("upload", {}),
        idle_rss_bytes={},
        streams={},
        tunnel_status_after={},
    )
    lines = side_by_side(report)
    assert lines[1].split() == ["homeport", "ssh", "-R", "pipenet", "pagekite", "two", "relays"]
    rate_row = next(line for line in lines if line.startswith("GET /1k c=100"))
    assert rate_row.split()[-5:] == ["0.40", "0.08", "0.045", "0.0006", "0.44"]
    p99_row = next(line for line in lines if "p99" in line)
    assert p99_row.split()[-5:] == ["2.50", "12.50", "22.22", "1666.67", "2.27"]

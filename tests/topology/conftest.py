"""Fixtures of the topology suite: a test bed of network namespaces and what runs in it.

One bed per module (built in well under a second); the Pi's services live as
long as it; each test starts its own exit server and client, so a fault in
one test cannot leak into the next. Everything is torn down, by PID and by
namespace, even when a test fails.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import ROOT
from tests.topology.bed import PUBLIC_IP, TestBed, remove_stale_beds
from tests.topology.services import (
    Answer,
    Client,
    ExitServer,
    PiServices,
    Processes,
    curl,
    start_client,
    start_exit_server,
)
from tunnel.auth import generate_token, write_secret_file

ARTIFACTS = ROOT / "test-artifacts" / "topology"
#: measurements printed at the end of the run (and written to ARTIFACTS/figures.txt)
FIGURES: list[str] = []
_bed_tags = itertools.count(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/topology/" not in str(item.fspath):
            continue
        item.add_marker(pytest.mark.topology)
        item.add_marker(pytest.mark.e2e)
        if os.geteuid() != 0:
            item.add_marker(
                pytest.mark.skip(
                    reason="the topology suite builds network namespaces and firewalls "
                    "(ip netns, nft), which needs root; CI runs it as root"
                )
            )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("topology: measured figures")
        for line in FIGURES:
            terminalreporter.write_line(line)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "figures.txt").write_text("\n".join(FIGURES) + "\n")


def record_figure(line: str) -> None:
    """Keep a measurement for the end-of-run summary (and ARTIFACTS/figures.txt)."""
    FIGURES.append(line)


@pytest.fixture(scope="module")
def bed() -> Iterator[TestBed]:
    """The five namespaces, built for this module and always torn down."""
    remove_stale_beds()
    test_bed = TestBed(str(next(_bed_tags)))
    try:
        test_bed.build()
        yield test_bed
    finally:
        test_bed.destroy()
    assert not test_bed.existing(), "namespaces left behind"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("topology")


@pytest.fixture(scope="module")
def token_file(work: Path) -> Path:
    path = work / "token"
    write_secret_file(path, generate_token())
    return path


@pytest.fixture(scope="module")
def status_header(work: Path, token_file: Path) -> Path:
    """A curl header file with the token, so it never appears on a command line."""
    path = work / "status-header"
    write_secret_file(path, f"Authorization: Bearer {token_file.read_text().strip()}\n")
    return path


@pytest.fixture(scope="module")
def pi_services(request: pytest.FixtureRequest, bed: TestBed, work: Path) -> Iterator[PiServices]:
    services = PiServices(bed, work / "pi")
    try:
        services.start()
        yield services
    finally:
        services.stop()
        services.processes.save_logs(ARTIFACTS / "logs" / request.module.__name__)


@dataclass
class Topology:
    """The bed, the Pi's services, and starters for this test's exit server and client."""

    bed: TestBed
    pi: PiServices
    processes: Processes
    token_file: Path
    data_dir: Path
    status_header: Path

    def start_server(self, *flags: str) -> ExitServer:
        return start_exit_server(
            self.processes,
            self.bed,
            token_file=self.token_file,
            data_dir=self.data_dir,
            status_header=self.status_header,
            flags=flags,
        )

    def start_client(self, server: ExitServer, *flags: str, wait: bool = True) -> Client:
        return start_client(
            self.processes, self.bed, server, token_file=self.token_file, flags=flags, wait=wait
        )

    def visit(self, path: str, *options: str, max_time: float = 10.0) -> Answer:
        """A request from the visitor to the exit node's public address."""
        return curl(self.bed.visitor, f"http://{PUBLIC_IP}{path}", *options, max_time=max_time)


@pytest.fixture
def topology(
    request: pytest.FixtureRequest,
    bed: TestBed,
    pi_services: PiServices,
    work: Path,
    token_file: Path,
    status_header: Path,
) -> Iterator[Topology]:
    """What a test needs; every process it started is ended, and its output kept in ARTIFACTS."""
    processes = Processes()
    try:
        yield Topology(
            bed=bed,
            pi=pi_services,
            processes=processes,
            token_file=token_file,
            data_dir=work / "exit-data",  # one certificate per module: its pin stays valid
            status_header=status_header,
        )
    finally:
        processes.stop_all()
        processes.save_logs(ARTIFACTS / "logs" / request.node.name)
    crashed = processes.crashed()
    assert not crashed, "\n\n".join(f"{p.name} crashed:\n{p.output}" for p in crashed)

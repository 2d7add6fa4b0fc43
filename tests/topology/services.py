"""What runs in the test bed: the Pi's services, the exit server, the client, and visitors' tools.

Every program is a real process started with ``ip netns exec NAMESPACE …``
(which execs, so the PID we hold is the program's own) and ended by that PID.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from tests.support.processes import Process, homeport
from tests.topology.bed import CONTROL_PORT, PUBLIC_IP, Namespace, TestBed

SITE_FILES: Final = Path(__file__).resolve().parent / "site"
NGINX_PORT: Final = 8080
FUNCTIONS_PORT: Final = 8081
#: the file the bad-network test downloads; random, so nothing on the way can compress it
LARGE_FILE: Final = "large.bin"
LARGE_FILE_BYTES: Final = 4 * 1024 * 1024

READY: Final = r"exit server ready: visitors on http://.*, clients on wss://"
CLIENT_COMMAND: Final = (
    r"on the client, run: homeport client --url (wss://\S+) --fingerprint (sha256:[0-9a-f]{64})"
)
CONNECTED: Final = r"connected to wss://\S+ as (\S+) \(session (\w+)\)"

NGINX_CONF: Final = """\
daemon off;
master_process off;  # one process: a power cut kills all of nginx with one SIGKILL
pid {work}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 512; }}
http {{
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    access_log off;
    sendfile on;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    map $http_upgrade $connection_upgrade {{ default upgrade; "" close; }}
    server {{
        listen {port};
        root {site};
        location / {{ try_files $uri $uri/ =404; }}
        location ~ ^/(function|async-function|system)/ {{
            proxy_pass http://127.0.0.1:{functions_port};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
        }}
        location = /ws {{
            proxy_pass http://127.0.0.1:{functions_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 1h;
        }}
    }}
}}
"""


class Processes:
    """Every process a fixture started, ended by PID at teardown (newest first)."""

    def __init__(self) -> None:
        self.started: list[Process] = []

    def start(self, name: str, args: list[str]) -> Process:
        process = Process(name, args).start()
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop(timeout=10)

    def save_logs(self, directory: Path) -> None:
        """Write each process's output to ``directory/NAME.log`` (numbered if a name repeats)."""
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        for n, process in enumerate(self.started):
            (directory / f"{n:02d}-{process.name}.log").write_text(process.output + "\n")

    def crashed(self) -> list[Process]:
        """Those whose output shows a traceback: homeport must fail loud, never like that."""
        return [
            process
            for process in self.started
            if "Traceback (most recent call last)" in process.output
        ]


# -- the Pi's site -----------------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    """A gradient as a PNG file: an image the browser must decode, made without a library."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 4 % 256, y * 4 % 256, 160)) for x in range(width))
        for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def make_site(directory: Path) -> str:
    """Lay out the static site nginx serves; return the SHA-256 of the large file."""
    shutil.copytree(SITE_FILES, directory)
    (directory / "logo.png").write_bytes(png(64, 64))
    large = os.urandom(LARGE_FILE_BYTES)
    (directory / LARGE_FILE).write_bytes(large)
    return hashlib.sha256(large).hexdigest()


class PiServices:
    """The upstreams on the Pi: nginx with the static site, and the function gateway."""

    def __init__(self, bed: TestBed, work: Path) -> None:
        self.bed = bed
        self.work = work
        self.site = work / "site"
        self.large_file_sha256 = make_site(self.site)
        self.nginx_conf = work / "nginx.conf"
        self.nginx_conf.write_text(
            NGINX_CONF.format(
                work=work, site=self.site, port=NGINX_PORT, functions_port=FUNCTIONS_PORT
            )
        )
        self.processes = Processes()
        self.functions: Process | None = None

    def start(self) -> None:
        """Start both services and wait until they answer."""
        pi = self.bed.pi
        self.functions = self.processes.start(
            "functions",
            pi.argv(
                sys.executable, "-m", "tests.topology.functions", "--port", str(FUNCTIONS_PORT)
            ),
        )
        self.processes.start(
            "nginx",
            pi.argv("nginx", "-e", "stderr", "-p", str(self.work), "-c", str(self.nginx_conf)),
        )
        self.functions.wait_for("functions listening")
        wait_answering(pi, f"http://127.0.0.1:{NGINX_PORT}/", within=15)

    def power_cut(self) -> None:
        """SIGKILL every service, as a power cut would: no goodbye to anyone."""
        for process in self.processes.started:
            process.kill()

    def stop(self) -> None:
        self.processes.stop_all()


# -- the tunnel --------------------------------------------------------------------------


@dataclass
class ExitServer:
    """``homeport server`` in the exit namespace, on :80 and :8123 with TLS."""

    process: Process
    namespace: Namespace
    client_url: str
    fingerprint: str
    certificate: Path
    status_header: Path

    def status(self) -> dict[str, Any]:
        """``GET /status`` on the control port, from the exit node itself."""
        result = self.namespace.run(
            "curl", "-sS", "--max-time", "5", "--cacert", str(self.certificate),
            "-H", f"@{self.status_header}", f"https://{PUBLIC_IP}:{CONTROL_PORT}/status",
        )  # fmt: skip
        status: dict[str, Any] = json.loads(result.stdout)
        return status


@dataclass
class Client:
    """``homeport client`` on the Pi."""

    process: Process

    def wait_connected(self, within: float = 20.0, since: int = 0) -> str:
        """Wait for a session; return its id."""
        return self.process.wait_for(CONNECTED, within, since).group(2)


def start_exit_server(
    processes: Processes,
    bed: TestBed,
    *,
    token_file: Path,
    data_dir: Path,
    status_header: Path,
    flags: tuple[str, ...] = (),
) -> ExitServer:
    process = processes.start(
        "exit-server",
        bed.exit.argv(
            *homeport(
                "server",
                "--port", "80",
                "--control-port", str(CONTROL_PORT),
                "--token-file", str(token_file),
                "--auto-tls", "--auto-tls-san", PUBLIC_IP,
                "--data-dir", str(data_dir),
                *flags,
            )
        ),
    )  # fmt: skip
    process.wait_for(READY)
    command = process.wait_for(CLIENT_COMMAND)
    return ExitServer(
        process=process,
        namespace=bed.exit,
        client_url=command.group(1),
        fingerprint=command.group(2),
        certificate=data_dir / "tls.crt",
        status_header=status_header,
    )


def start_client(
    processes: Processes,
    bed: TestBed,
    server: ExitServer,
    *,
    token_file: Path,
    flags: tuple[str, ...] = (),
    wait: bool = True,
) -> Client:
    """Start the client as the exit server told us to, serving nginx on the default route."""
    client = Client(
        processes.start(
            "client",
            bed.pi.argv(
                *homeport(
                    "client",
                    "--url", server.client_url,
                    "--fingerprint", server.fingerprint,
                    "--token-file", str(token_file),
                    "--upstream", f"http://127.0.0.1:{NGINX_PORT}",
                    "--name", "pi",
                    *flags,
                )
            ),
        )
    )  # fmt: skip
    if wait:
        client.wait_connected()
    return client


# -- visitors ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What curl got: ``status`` 0 when there was no HTTP answer at all."""

    status: int
    body: bytes
    seconds: float
    error: str
    info: dict[str, Any]


def curl(namespace: Namespace, url: str, *options: str, max_time: float = 10.0) -> Answer:
    """One request with curl from ``namespace``; never raises for HTTP or network errors."""
    result = subprocess.run(
        namespace.argv(
            "curl", "-sS", "--max-time", str(max_time), "-w", "%{stderr}\n%{json}", *options, url
        ),
        capture_output=True,
        timeout=max_time + 10,
        check=False,
    )
    *errors, info_line = result.stderr.decode(errors="replace").rstrip("\n").split("\n")
    info: dict[str, Any] = json.loads(info_line)
    return Answer(
        status=int(info.get("http_code") or 0),
        body=result.stdout,
        seconds=float(info.get("time_total") or 0.0),
        error=" ".join(line for line in errors if line).strip(),
        info=info,
    )


def wait_answering(namespace: Namespace, url: str, within: float) -> None:
    """Wait until ``url`` answers at all from ``namespace`` (a service finished starting)."""
    deadline = time.monotonic() + within
    while True:
        answer = curl(namespace, url, max_time=2)
        if answer.status:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer within {within} s: {answer.error}")
        time.sleep(0.1)


def visitor_load(processes: Processes, bed: TestBed, *args: str) -> Process:
    """Start tests/topology/visitors.py in the visitor namespace."""
    return processes.start(
        "visitors", bed.visitor.argv(sys.executable, "-m", "tests.topology.visitors", *args)
    )


def visitor_results(process: Process) -> list[dict[str, Any]]:
    """The per-request records a finished visitors.py printed."""
    return [json.loads(line) for line in process.lines if line.startswith("{")]

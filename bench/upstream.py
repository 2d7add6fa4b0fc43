"""The upstream: our own nginx on 127.0.0.1, serving a small and a large file and taking uploads.

It is never the system's nginx service. Everything it touches (config, pid
file, error log, temp paths, the files it serves) lives in the benchmark's temp
directory, and it runs in the foreground (``daemon off;``) as a child we end
by its PID.

``worker_processes 1``: the machine has 2 cores, shared by nginx, wrk, the
exit server and the client. One nginx worker is far faster than the tunnel
at serving a 1 KiB file, so it never limits the tunnel figures, and a second
worker would only take CPU from the processes being measured. Both the direct
and the tunnel figures come from this same nginx.

``POST /upload`` reads the whole body before it answers: ``mirror`` with
``mirror_request_body on`` makes nginx read the body (into one memory buffer)
before the content phase, whose 405 for a POST ``error_page`` turns into a
200. A body that is only discarded would leave no trace; this one is counted
in ``$request_length``, which the upload log (the only access log, for that
location alone) records so that each upload can be checked to have crossed
whole.

With a certificate (:func:`run_nginx`'s ``certificate``) the same server
also listens with ``ssl`` on a second port: TLS 1.3 only, OpenSSL's default
suites and groups (AES-256-GCM, X25519, as homeport's HTTPS port agrees on),
session tickets on (nginx's default), so a client that keeps its session
resumes it on its next connection.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.errors import BenchError
from bench.processes import LOOPBACK, Child, free_port, http_get, running, wait_until
from tunnel.tls import Certificate

SMALL_PATH: Final = "/1k"
SMALL_BYTES: Final = 1024
LARGE_PATH: Final = "/100m"
LARGE_BYTES: Final = 100 * 1024 * 1024
UPLOAD_PATH: Final = "/upload"
UPLOAD_LOG_NAME: Final = "nginx-upload.log"
READY_TIMEOUT_S: Final = 10.0
_WRITE_CHUNK_BYTES: Final = 1024 * 1024
# Modules whose temp path nginx creates at start-up unless built without them.
_TEMP_PATH_MODULES: Final = ("proxy", "fastcgi", "uwsgi", "scgi")

_CONFIG_TEMPLATE: Final = """\
# Written by homeport's benchmark (bench/upstream.py); not the system nginx.
daemon off;
master_process on;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/nginx-error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    client_body_temp_path {root}/temp/client_body;
    client_max_body_size 0;
    log_format upload '$status $request_length $request_time';
{temp_paths}
    server {{
        listen {host}:{port};
{tls_lines}        root {root}/www;
        location / {{
        }}
        location = {upload_path} {{
            client_body_buffer_size 128m;
            client_body_in_single_buffer on;
            mirror /upload-mirror;
            mirror_request_body on;
            error_page 404 405 =200 /uploaded;
        }}
        location = /upload-mirror {{
            internal;
            return 204;
        }}
        location = /uploaded {{
            internal;
            access_log {root}/{upload_log} upload;
            return 200 "uploaded\\n";
        }}
    }}
}}
"""


@dataclass(frozen=True)
class Upstream:
    """A running nginx and what it serves."""

    port: int
    small_body: bytes
    process: Child
    root: Path  # the temp directory holding its config, logs and files
    #: the port nginx serves over TLS, when it was given a certificate
    tls_port: int | None = None

    @property
    def upload_log(self) -> Path:
        """nginx's log of uploads: one ``STATUS REQUEST_LENGTH REQUEST_TIME`` line each."""
        return self.root / UPLOAD_LOG_NAME

    @property
    def url(self) -> str:
        """The upstream's base URL, as the client is told to dial it."""
        return f"http://{LOOPBACK}:{self.port}"


def write_site(root: Path) -> bytes:
    """Write the files nginx serves under ``root/www``; return the small file's bytes.

    The files are random so that nothing on the way can compress them.
    """
    www = root / "www"
    www.mkdir(mode=0o755)
    small_body = os.urandom(SMALL_BYTES)
    (www / SMALL_PATH.lstrip("/")).write_bytes(small_body)
    with (www / LARGE_PATH.lstrip("/")).open("wb") as large:
        for _ in range(LARGE_BYTES // _WRITE_CHUNK_BYTES):
            large.write(os.urandom(_WRITE_CHUNK_BYTES))
    for path in www.iterdir():
        path.chmod(0o644)
    return small_body


@dataclass(frozen=True)
class TlsListener:
    """nginx's second port, served over TLS with a certificate and its key."""

    port: int
    cert: Path
    key: Path


def write_config(root: Path, port: int, nginx_build: str, tls: TlsListener | None = None) -> Path:
    """Write ``nginx.conf`` for ``port`` (and ``tls``) under ``root``; return its path."""
    temp = root / "temp"
    temp.mkdir(mode=0o755)
    config = root / "nginx.conf"
    config.write_text(render_config(root, port, nginx_build, tls))
    return config


def render_config(root: Path, port: int, nginx_build: str, tls: TlsListener | None = None) -> str:
    """The text of ``nginx.conf``: plain HTTP on ``port``, and over TLS on ``tls.port``.

    ``nginx_build`` is ``nginx -V``'s output: it tells which modules are built
    in, and so which temp paths must be moved out of /var/lib/nginx.
    """
    temp = root / "temp"
    lines = [
        f"    {module}_temp_path {temp}/{module};"
        for module in _TEMP_PATH_MODULES
        if f"--without-http_{module}_module" not in nginx_build
    ]
    tls_lines = ""
    if tls is not None:
        tls_lines = (
            f"        listen {LOOPBACK}:{tls.port} ssl;\n"
            f"        ssl_certificate {tls.cert};\n"
            f"        ssl_certificate_key {tls.key};\n"
            "        ssl_protocols TLSv1.3;\n"
        )
    return _CONFIG_TEMPLATE.format(
        root=root,
        host=LOOPBACK,
        port=port,
        tls_lines=tls_lines,
        upload_path=UPLOAD_PATH,
        upload_log=UPLOAD_LOG_NAME,
        temp_paths="\n".join(lines) + "\n",
    )


def nginx_version(nginx_build: str) -> str:
    """``1.22.1`` from ``nginx -V``'s output (or the whole first line if it differs)."""
    match = re.search(r"nginx/(\S+)", nginx_build)
    if match is not None:
        return match.group(1)
    return nginx_build.splitlines()[0] if nginx_build else "unknown"


@contextlib.contextmanager
def run_nginx(
    nginx: Path,
    root: Path,
    nginx_build: str,
    small_body: bytes,
    certificate: Certificate | None = None,
) -> Iterator[Upstream]:
    """Run nginx from a config under ``root`` on a free port; stop it on the way out.

    With ``certificate`` it also serves over TLS on a second free port
    (``Upstream.tls_port``). The temp directory is made world-readable:
    nginx started as root serves files from a worker that runs as ``nobody``.

    Raises:
        BenchError: nginx exited or did not serve ``/1k`` (on each port) within
            ``READY_TIMEOUT_S``.
    """
    root.chmod(0o755)
    port = free_port()
    tls = None
    if certificate is not None:
        tls = TlsListener(free_port(), certificate.cert_path, certificate.key_path)
    config = write_config(root, port, nginx_build, tls)
    args = [str(nginx), "-p", f"{root}/", "-e", str(root / "nginx-error.log"), "-c", str(config)]
    child = Child("nginx", args, root / "nginx-output.log", cwd=root)
    with running(child) as process:
        upstream = Upstream(port, small_body, process, root, tls.port if tls else None)
        wait_until(
            lambda: serves(upstream.port, small_body, process),
            READY_TIMEOUT_S,
            f"nginx serving {SMALL_PATH} on {LOOPBACK}:{port}",
        )
        if tls is not None and certificate is not None:
            context = verifying_context(certificate)
            wait_until(
                lambda: serves(tls.port, small_body, process, tls=context),
                READY_TIMEOUT_S,
                f"nginx serving {SMALL_PATH} over TLS on {LOOPBACK}:{tls.port}",
            )
        yield upstream


def verifying_context(certificate: Certificate) -> ssl.SSLContext:
    """A client context that trusts ``certificate`` alone and checks the name it connects to."""
    return ssl.create_default_context(cafile=certificate.cert_path)


def serves(
    port: int,
    small_body: bytes,
    *processes: Child,
    host: str | None = None,
    tls: ssl.SSLContext | None = None,
) -> bool:
    """Whether ``GET /1k`` on ``port`` (with ``Host: host``) answers 200 with ``small_body``.

    With ``tls``, over TLS with that context.

    Raises:
        BenchError: one of ``processes`` has exited, so waiting longer is pointless.
    """
    for process in processes:
        process.check_running()
    try:
        status, body = http_get(port, SMALL_PATH, {"Host": host} if host else None, tls=tls)
    except (OSError, http.client.HTTPException):
        return False
    if status == 200 and body != small_body:
        raise BenchError(f"{SMALL_PATH} on port {port} answered 200 with a different body")
    return status == 200


@dataclass(frozen=True)
class UploadRecord:
    """One line of nginx's upload log: what nginx answered and how much it read."""

    status: int
    request_length: int  # request line, head and body
    request_time_s: float


def upload_records(log: Path) -> list[UploadRecord]:
    """Every upload nginx has logged so far, oldest first.

    Raises:
        BenchError: a line is not ``STATUS LENGTH TIME``.
    """
    if not log.exists():
        return []
    records = []
    for line in log.read_text().splitlines():
        try:
            status, length, seconds = line.split()
            records.append(UploadRecord(int(status), int(length), float(seconds)))
        except ValueError:
            raise BenchError(f"cannot read nginx's upload log line {line!r}") from None
    return records

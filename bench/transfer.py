"""One large download or upload at a time with curl: the throughput of one stream.

curl is a C client, so on this small machine it takes little CPU from the
processes being measured (a Python client would take a core). Downloads go to
/dev/null; uploads send the same 100 MiB file with ``--data-binary``, without
``Expect: 100-continue`` (browsers do not send it either, and it would add a
round trip that is not the tunnel's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.errors import BenchError
from bench.processes import LOOPBACK, run_bounded

TRANSFER_TIMEOUT_S: Final = 120.0
MIB: Final = 1024 * 1024
GIB: Final = 1024 * MIB
_DOWNLOAD_WRITE_OUT: Final = "%{http_code} %{size_download} %{time_total} %{time_starttransfer}"
_UPLOAD_WRITE_OUT: Final = "%{http_code} %{size_upload} %{time_total} %{time_starttransfer}"


@dataclass(frozen=True)
class TransferResult:
    """One download or upload: how many body bytes crossed, in how long."""

    bytes: int
    total_s: float
    first_byte_s: float  # until the first byte of the answer

    @property
    def mib_per_s(self) -> float:
        """Throughput over the whole transfer, in MiB/s."""
        return self.bytes / MIB / self.total_s if self.total_s > 0 else 0.0


def download(
    curl: Path,
    port: int,
    path: str,
    expected_bytes: int,
    cwd: Path,
    headers: Sequence[str] = (),
    *,
    cacert: Path | None = None,
) -> TransferResult:
    """GET ``path`` from 127.0.0.1:``port`` with curl into /dev/null and time it.

    ``headers`` (``"Host: name"``) are added to the request. With ``cacert``
    it is over HTTPS, the server's certificate checked against that file.

    Raises:
        BenchError: curl failed, the status was not 200 or the body was short.
    """
    args = [*_header_args(headers), "--output", "/dev/null", "--write-out", _DOWNLOAD_WRITE_OUT]
    scheme = "http"
    if cacert is not None:
        args += ["--cacert", str(cacert)]
        scheme = "https"
    return _curl(curl, args, port, path, expected_bytes, cwd, scheme)


def upload(
    curl: Path, port: int, path: str, body: Path, cwd: Path, headers: Sequence[str] = ()
) -> TransferResult:
    """POST the file ``body`` to ``path`` on 127.0.0.1:``port`` with curl and time it.

    curl's ``size_upload`` only says what curl wrote to its socket; that the
    upstream read it all is the caller's to check (nginx's upload log).

    Raises:
        BenchError: curl failed, the status was not 200 or the body went short.
    """
    args = [
        "--data-binary",
        f"@{body}",
        "--header",
        "Content-Type: application/octet-stream",
        "--header",
        "Expect:",
        *_header_args(headers),
        "--output",
        "/dev/null",
        "--write-out",
        _UPLOAD_WRITE_OUT,
    ]
    return _curl(curl, args, port, path, body.stat().st_size, cwd)


def _header_args(headers: Sequence[str]) -> list[str]:
    """curl's ``--header H`` for each of ``headers``."""
    return [arg for header in headers for arg in ("--header", header)]


def _curl(
    curl: Path,
    args: list[str],
    port: int,
    path: str,
    expected_bytes: int,
    cwd: Path,
    scheme: str = "http",
) -> TransferResult:
    """Run curl with ``args`` against ``scheme://127.0.0.1:port/path``; read its ``--write-out``."""
    command = [
        str(curl),
        "--silent",
        "--show-error",
        "--noproxy",
        "*",
        "--max-time",
        f"{TRANSFER_TIMEOUT_S:.0f}",
        *args,
        f"{scheme}://{LOOPBACK}:{port}{path}",
    ]
    code, stdout, stderr = run_bounded("curl", command, TRANSFER_TIMEOUT_S + 10, cwd)
    if code != 0:
        raise BenchError(f"curl {path} on port {port} failed (status {code}): {stderr.strip()}")
    try:
        http_code, size, total, first_byte = stdout.split()
        result = TransferResult(int(float(size)), float(total), float(first_byte))
    except ValueError:
        raise BenchError(f"cannot read curl's --write-out: {stdout!r}") from None
    if http_code != "200" or result.bytes != expected_bytes:
        raise BenchError(
            f"{path} on port {port} answered {http_code} after {result.bytes} body bytes, "
            f"expected 200 after {expected_bytes}"
        )
    return result

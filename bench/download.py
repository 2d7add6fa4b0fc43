"""One large download at a time with curl, its body thrown away: the throughput of one stream.

curl is a C client, so on this small machine it takes little CPU from the
exit server and client being measured (a Python client would take a core).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.errors import BenchError
from bench.processes import LOOPBACK, run_bounded

DOWNLOAD_TIMEOUT_S: Final = 120.0
MIB: Final = 1024 * 1024
_WRITE_OUT: Final = "%{http_code} %{size_download} %{time_total} %{time_starttransfer}"


@dataclass(frozen=True)
class DownloadResult:
    """One download: how many bytes came, in how long."""

    bytes: int
    total_s: float
    first_byte_s: float

    @property
    def mib_per_s(self) -> float:
        """Throughput over the whole download, in MiB/s."""
        return self.bytes / MIB / self.total_s if self.total_s > 0 else 0.0


def download(curl: Path, port: int, path: str, expected_bytes: int, cwd: Path) -> DownloadResult:
    """GET ``path`` from 127.0.0.1:``port`` with curl into /dev/null and time it.

    Raises:
        BenchError: curl failed, the status was not 200 or the body was short.
    """
    args = [
        str(curl),
        "--silent",
        "--show-error",
        "--noproxy",
        "*",
        "--max-time",
        f"{DOWNLOAD_TIMEOUT_S:.0f}",
        "--output",
        "/dev/null",
        "--write-out",
        _WRITE_OUT,
        f"http://{LOOPBACK}:{port}{path}",
    ]
    code, stdout, stderr = run_bounded("curl", args, DOWNLOAD_TIMEOUT_S + 10, cwd)
    if code != 0:
        raise BenchError(f"curl {path} on port {port} failed (status {code}): {stderr.strip()}")
    try:
        http_code, size, total, first_byte = stdout.split()
        result = DownloadResult(int(float(size)), float(total), float(first_byte))
    except ValueError:
        raise BenchError(f"cannot read curl's --write-out: {stdout!r}") from None
    if http_code != "200" or result.bytes != expected_bytes:
        raise BenchError(
            f"GET {path} on port {port} answered {http_code} with {result.bytes} bytes, "
            f"expected 200 with {expected_bytes}"
        )
    return result

"""bench.tls_cost moves every byte each way it measures and reports both sides' CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import tls_cost


def test_each_way_moves_every_byte_and_reports_both_sides(tmp_path: Path) -> None:
    # A receiver reports only once it counted every byte, and a transfer
    # whose receiver fails raises: each result is a complete transfer.
    total = 40 * tls_cost.WRITE_BYTES
    contexts = tls_cost.make_contexts(tmp_path)
    for mode in tls_cost.MODES:
        transfer = tls_cost.measure(mode, total, contexts)
        assert transfer.mode == mode
        assert transfer.total_bytes == total
        assert transfer.sender_cpu_s > 0
        assert transfer.receiver_cpu_s > 0
        assert transfer.wall_s > 0


def test_the_table_has_a_row_per_way(capsys: pytest.CaptureFixture[str]) -> None:
    assert tls_cost.main(["--gib", "0.01", "--rounds", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row.split("  ")[0].strip() for row in rows] == list(tls_cost.MODES)


def test_a_transfer_smaller_than_one_write_is_refused() -> None:
    with pytest.raises(SystemExit):
        tls_cost.main(["--gib", "0.0000001"])


def test_a_mode_whose_handshake_agreed_on_another_cipher_is_not_measured(tmp_path: Path) -> None:
    contexts = tls_cost.make_contexts(tmp_path)
    aes_only = tls_cost.Contexts(
        contexts.server, {**contexts.clients, "uvloop ChaCha20": contexts.clients["uvloop TLS"]}
    )
    with pytest.raises(RuntimeError, match="agreed on"):
        tls_cost.measure("uvloop ChaCha20", 4 * tls_cost.WRITE_BYTES, aes_only)

"""docs/protocol.md and the code describe the same protocol: its tables are checked here."""

from __future__ import annotations

import re
from pathlib import Path

from tunnel.errors import HTTP_STATUS_FOR_CODE, ErrorCode
from tunnel.frames import FrameType
from tunnel.mux import TRANSITIONS, StreamInput, StreamState

DOC = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()


def table(name: str) -> list[list[str]]:
    section = re.search(rf"<!-- {name}:begin -->(.*?)<!-- {name}:end -->", DOC, re.S)
    assert section, f"docs/protocol.md has no {name} table"
    rows = [line for line in section.group(1).strip().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def test_the_state_table_in_the_spec_is_the_one_the_mux_uses() -> None:
    documented = {
        (StreamState[state], StreamInput[event]): StreamState[next_state]
        for state, event, next_state in table("transitions")
    }
    assert documented == TRANSITIONS


def test_the_error_code_table_matches_codes_and_http_statuses() -> None:
    rows = table("error-codes")
    assert [(int(code, 16), name) for code, name, *_ in rows] == [
        (c.value, c.name) for c in ErrorCode
    ]
    assert {ErrorCode[name]: int(status) for _, name, _, status in rows} == HTTP_STATUS_FOR_CODE


def test_every_frame_type_has_a_section() -> None:
    for frame_type in FrameType:
        assert re.search(rf"### 4\.\d+ {frame_type.name} \(0x{frame_type.value:x}\)", DOC), (
            frame_type.name
        )

"""The frame codec: round trips, every rejection, and fuzzing however input is split."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunnel.errors import ErrorCode, ProtocolError
from tunnel.frames import (
    HEADER,
    MAX_HELLO_BYTES,
    Data,
    Frame,
    FrameDecoder,
    FrameType,
    GoAway,
    Hello,
    Open,
    Ping,
    Rst,
    WindowUpdate,
    encode,
)

FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

SAMPLES: list[Frame] = [
    Data(1, b"hello", end_stream=False),
    Data(3, b"", end_stream=True),
    Data(2**31 - 1, b"x" * 1000, end_stream=True),
    Open(2, "fn.example.com"),
    Open(4, ""),
    WindowUpdate(5, 65536),
    WindowUpdate(5, 2**31 - 1),
    Rst(7, ErrorCode.CONNECT_REFUSED),
    Ping(b"12345678"),
    Ping(b"abcdefgh", ack=True),
    GoAway(8, ErrorCode.NO_ERROR, "shutting down"),
    GoAway(0, ErrorCode.REPLACED, ""),
    Hello({"version": 1, "routes": [{"host": ""}]}),
]


def normalised(frames: list[Frame]) -> list[Frame]:
    """DATA payloads as bytes, so decoded frames compare equal to the originals."""
    return [
        Data(f.stream_id, bytes(f.data), f.end_stream) if isinstance(f, Data) else f for f in frames
    ]


@pytest.mark.parametrize("frame", SAMPLES, ids=str)
def test_every_frame_type_round_trips(frame: Frame) -> None:
    wire = encode(frame)
    assert normalised(FrameDecoder().decode_message(wire)) == [frame]


def test_several_frames_in_one_message_decode_in_order() -> None:
    wire = b"".join(encode(f) for f in SAMPLES)
    assert normalised(FrameDecoder().decode_message(wire)) == SAMPLES


def test_data_payload_is_a_zero_copy_view_of_the_message() -> None:
    wire = encode(Data(1, b"payload"))
    (frame,) = FrameDecoder().decode_message(wire)
    assert isinstance(frame, Data)
    assert isinstance(frame.data, memoryview)
    assert frame.data.obj is wire


def test_str_of_a_frame_never_shows_the_payload() -> None:
    assert "secret" not in str(Data(1, b"secret-token-bytes"))
    assert str(Data(5, b"abc", end_stream=True)) == "DATA sid=5 3 bytes END_STREAM"


def header(type_: int, flags: int, stream_id: int, length: int) -> bytes:
    return HEADER.pack(type_, flags, stream_id, length)


@pytest.mark.parametrize(
    ("wire", "code", "fragment"),
    [
        (header(0x7F, 0, 1, 0), ErrorCode.PROTOCOL_ERROR, "unknown frame type"),
        (header(FrameType.DATA, 0, 0, 0), ErrorCode.PROTOCOL_ERROR, "invalid stream 0"),
        (header(FrameType.DATA, 0, 2**31, 0), ErrorCode.PROTOCOL_ERROR, "invalid stream"),
        (header(FrameType.DATA, 0, 1, 2**32 - 1), ErrorCode.FRAME_SIZE_ERROR, "exceeds limit"),
        (header(FrameType.OPEN, 0, 0, 0), ErrorCode.PROTOCOL_ERROR, "OPEN on invalid stream 0"),
        (header(FrameType.OPEN, 0, 1, 256) + b"a" * 256, ErrorCode.FRAME_SIZE_ERROR, "route"),
        (header(FrameType.OPEN, 0, 1, 2) + b"\xff\xfe", ErrorCode.PROTOCOL_ERROR, "UTF-8"),
        (header(FrameType.WINDOW_UPDATE, 0, 1, 3) + b"abc", ErrorCode.FRAME_SIZE_ERROR, "payload"),
        (
            header(FrameType.WINDOW_UPDATE, 0, 1, 4) + struct.pack("!I", 0),
            ErrorCode.PROTOCOL_ERROR,
            "out of range",
        ),
        (
            header(FrameType.WINDOW_UPDATE, 0, 1, 4) + struct.pack("!I", 2**31),
            ErrorCode.PROTOCOL_ERROR,
            "out of range",
        ),
        (header(FrameType.RST, 0, 1, 5) + b"12345", ErrorCode.FRAME_SIZE_ERROR, "payload"),
        (header(FrameType.PING, 0, 1, 8) + b"8 bytes!", ErrorCode.PROTOCOL_ERROR, "must be 0"),
        (header(FrameType.PING, 0, 0, 4) + b"four", ErrorCode.FRAME_SIZE_ERROR, "PING"),
        (header(FrameType.GO_AWAY, 0, 0, 4) + b"four", ErrorCode.FRAME_SIZE_ERROR, "GO_AWAY"),
        (
            header(FrameType.GO_AWAY, 0, 0, 8) + struct.pack("!II", 2**31, 0),
            ErrorCode.PROTOCOL_ERROR,
            "last stream id",
        ),
        (header(FrameType.HELLO, 0, 0, 3) + b"[1]", ErrorCode.PROTOCOL_ERROR, "JSON object"),
        (header(FrameType.HELLO, 0, 0, 3) + b"{no", ErrorCode.PROTOCOL_ERROR, "valid JSON"),
        (
            header(FrameType.HELLO, 0, 0, MAX_HELLO_BYTES + 1) + b" " * (MAX_HELLO_BYTES + 1),
            ErrorCode.FRAME_SIZE_ERROR,
            "HELLO payload",
        ),
    ],
)
def test_malformed_frame_raises_protocol_error_with_its_code(
    wire: bytes, code: ErrorCode, fragment: str
) -> None:
    with pytest.raises(ProtocolError) as raised:
        FrameDecoder().decode_message(wire)
    assert raised.value.code is code
    assert fragment in str(raised.value)


def test_deeply_nested_hello_json_is_a_protocol_error_not_a_crash() -> None:
    payload = b"[" * 10_000 + b"]" * 10_000
    wire = header(FrameType.HELLO, 0, 0, len(payload)) + payload
    with pytest.raises(ProtocolError):
        FrameDecoder(max_payload=len(payload)).decode_message(wire)


def test_an_empty_message_is_rejected() -> None:
    with pytest.raises(ProtocolError, match="empty message") as raised:
        FrameDecoder().decode_message(b"")
    assert raised.value.code is ErrorCode.PROTOCOL_ERROR


def test_message_ending_inside_a_frame_is_rejected() -> None:
    wire = encode(Data(1, b"abcdef"))[:-2]
    with pytest.raises(ProtocolError, match="ends inside a frame"):
        FrameDecoder().decode_message(wire)


def test_oversized_length_is_rejected_from_the_header_alone() -> None:
    # No payload follows: the decoder must not wait for 4 GiB to arrive.
    decoder = FrameDecoder(max_payload=1024)
    with pytest.raises(ProtocolError) as raised:
        decoder.feed(header(FrameType.DATA, 0, 1, 1025))
    assert raised.value.code is ErrorCode.FRAME_SIZE_ERROR


def test_a_long_go_away_reason_is_cut_between_characters() -> None:
    reason = "a" + "é" * 200  # 401 bytes; the cap of 256 falls after one byte of a character
    (frame,) = FrameDecoder().decode_message(encode(GoAway(8, ErrorCode.NO_ERROR, reason)))
    assert isinstance(frame, GoAway)
    assert frame.reason == "a" + "é" * 127


def test_unknown_error_codes_are_read_as_internal_error() -> None:
    wire = header(FrameType.RST, 0, 1, 4) + struct.pack("!I", 0xDEAD)
    assert FrameDecoder().decode_message(wire) == [Rst(1, ErrorCode.INTERNAL_ERROR)]


def test_undefined_flags_are_ignored() -> None:
    wire = header(FrameType.WINDOW_UPDATE, 0xFE, 3, 4) + struct.pack("!I", 10)
    assert FrameDecoder().decode_message(wire) == [WindowUpdate(3, 10)]


def decode_all(chunks: list[bytes], max_payload: int = 4096) -> list[Frame] | ErrorCode:
    """Feed ``chunks`` one by one: the frames, or the code of the error raised."""
    decoder = FrameDecoder(max_payload)
    frames: list[Frame] = []
    try:
        for chunk in chunks:
            frames += decoder.feed(chunk)
    except ProtocolError as exc:
        return exc.code
    return frames


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


frames_strategy = st.lists(
    st.one_of(
        st.builds(Data, st.integers(1, 2**31 - 1), st.binary(max_size=300), st.booleans()),
        st.builds(
            Open,
            st.integers(1, 2**31 - 1),
            st.text(max_size=40).filter(lambda t: len(t.encode()) <= 255),
        ),
        st.builds(WindowUpdate, st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1)),
        st.builds(Rst, st.integers(1, 2**31 - 1), st.sampled_from(ErrorCode)),
        st.builds(Ping, st.binary(min_size=8, max_size=8), st.booleans()),
        st.builds(
            GoAway, st.integers(0, 2**31 - 1), st.sampled_from(ErrorCode), st.text(max_size=50)
        ),
    ),
    max_size=12,
)


@FUZZ
@given(frames=frames_strategy, cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_valid_frames_decode_the_same_however_the_bytes_are_split(
    frames: list[Frame], cuts: list[int]
) -> None:
    wire = b"".join(encode(f) for f in frames)
    expected = normalised(frames)
    assert decode_all([wire]) == expected
    assert decode_all(split(wire, cuts)) == expected
    assert decode_all([wire[i : i + 1] for i in range(len(wire))]) == expected


@FUZZ
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_any_bytes_decode_or_raise_protocol_error_whatever_the_chunking(
    data: bytes, cuts: list[int]
) -> None:
    whole = decode_all([data])
    # Only ProtocolError may escape (anything else fails the test), and the
    # outcome must not depend on how the bytes were cut.
    assert decode_all(split(data, cuts)) == whole
    assert decode_all([data[i : i + 1] for i in range(len(data))]) == whole


@FUZZ
@given(
    frames=frames_strategy,
    position=st.integers(min_value=0),
    byte=st.integers(0, 255),
)
def test_corrupted_valid_stream_decodes_or_raises_protocol_error(
    frames: list[Frame], position: int, byte: int
) -> None:
    wire = bytearray(b"".join(encode(f) for f in frames) or b"\x00")
    wire[position % len(wire)] = byte
    outcome = decode_all([bytes(wire)])
    assert outcome == decode_all([bytes(wire[i : i + 1]) for i in range(len(wire))])

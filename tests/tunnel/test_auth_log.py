"""Tokens and logging: generation, loading, constant-time checks, redaction, escaping."""

from __future__ import annotations

import base64
import logging
import os
import re
import stat
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from tunnel.auth import (
    TokenVerifier,
    bearer_token,
    generate_token,
    load_token,
    parse_token_hash,
    token_digest,
    validate_token,
    write_secret_file,
)
from tunnel.errors import ConfigError
from tunnel.log import RedactSecrets, escape


def test_generated_tokens_are_256_bit_url_safe_and_unique() -> None:
    tokens = {generate_token() for _ in range(100)}
    assert len(tokens) == 100
    for token in tokens:
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)


def test_verifier_accepts_only_the_token() -> None:
    token = generate_token()
    verifier = TokenVerifier.for_token(token)
    assert verifier.verify(token)
    for wrong in (None, "", token[:-1], token + "\n", token.upper(), "x" * 43):
        assert not verifier.verify(wrong)
    assert token not in repr(verifier)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token_is_read_from_the_authorization_header(
    header: str | None, expected: str | None
) -> None:
    assert bearer_token(header) == expected


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("", "empty"),
        ("qZ7-x9", "shorter than 16"),
        ("has space in it ok!", "spaces"),
        ("tab\there-and-more", "spaces"),
    ],
)
def test_malformed_tokens_are_refused_without_echoing_them(token: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as raised:
        validate_token(token, source="--token")
    if token:
        assert token not in str(raised.value)


def test_token_file_is_read_stripped_and_a_loose_mode_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = generate_token()
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        assert load_token(None, path) == token
    assert "can be read by other users" in caplog.text
    assert token not in caplog.text


def test_an_unreadable_token_file_is_a_clear_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the token file"):
        load_token(None, tmp_path / "missing")


def test_secret_files_are_written_0600(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "token"
    write_secret_file(path, "s3cret-token-value")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert path.read_text() == "s3cret-token-value\n"


def test_token_hash_forms_parse_to_the_digest() -> None:
    token = generate_token()
    hexdigest = token_digest(token).hex()
    assert parse_token_hash(hexdigest, source="x") == token_digest(token)
    assert parse_token_hash("sha256:" + hexdigest.upper(), source="x") == token_digest(token)
    with pytest.raises(ConfigError, match="64 hex digits"):
        parse_token_hash("abc", source="x")


def test_redaction_removes_secrets_from_messages_and_tracebacks() -> None:
    secret = generate_token()
    redactor = RedactSecrets([secret])
    try:
        raise ValueError(f"oops {secret}")
    except ValueError:
        record = logging.LogRecord(
            "t", logging.ERROR, __file__, 1, "got %s", (secret,), exc_info=True
        )
        import sys

        record.exc_info = sys.exc_info()
    redactor.filter(record)
    assert secret not in record.getMessage()
    assert record.exc_text is not None
    assert secret not in record.exc_text


def test_redaction_removes_the_url_and_base64_encoded_forms_too() -> None:
    secret = "my+secret/token=of-some-length"
    redactor = RedactSecrets([secret])
    forms = [
        secret,
        quote(secret, safe=""),
        quote_plus(secret),
        base64.b64encode(secret.encode()).decode(),
        base64.urlsafe_b64encode(secret.encode()).decode(),
    ]
    record = logging.LogRecord("t", logging.DEBUG, __file__, 1, " ".join(forms), None, None)
    redactor.filter(record)
    message = record.getMessage()
    assert not any(form in message for form in forms), message


def test_escape_neutralises_control_characters_for_log_lines() -> None:
    assert escape(b"/a\r\nInjected: yes\x1b[2J") == "/a\\x0d\\x0aInjected: yes\\x1b[2J"
    assert len(escape("x" * 10_000)) < 600
    assert escape('/say "hi"\\') == '/say \\"hi\\"\\\\'
    assert escape(b"/caf\xe9 ok") == "/caf\xe9 ok"
